"""One-to-one fidelity of an accelerated sampler to the full model: PSNR and SSIM.

Every method samples with the same noise and labels as the full model, so image i
of a method can be compared with image i of the full model. Both metrics take uint8 images in
the ADM layout (N, H, W, C) or (N, H, W), data range 255, and average per-image values.

PSNR of an image identical to its reference is infinite; it is capped at the PSNR of the
smallest error a uint8 image can have (one value off by one level: ``10 log10(255² · H·W·C)``,
70.97 dB for 8×8×3), so one identical image no longer makes a run's mean infinite and every
run keeps a finite, comparable value (:func:`psnr_cap`).

SSIM is Wang et al. (2004) as scikit-image computes it with ``gaussian_weights=True,
sigma=1.5, use_sample_covariance=False`` (Wang's population covariances): Gaussian window of 11
taps (sigma 1.5, truncated at 3.5 sigma), K1 = 0.01, K2 = 0.03, reflect padding, the SSIM map
averaged over the valid interior (a window radius cropped at each border), then over channels.
Images smaller than the window (the digits testbed is 8x8) get the largest odd window that fits,
with sigma scaled by the same factor (window / 11) so the window still spans ±3.5 sigma: 7 taps,
sigma ≈ 0.95 for 8x8, leaving a 2x2 interior.
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

DATA_RANGE = 255.0
SSIM_SIGMA = 1.5
SSIM_WINDOW = 11
SSIM_TRUNCATE = 3.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _pair(images: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(images), np.asarray(reference)
    if x.shape != y.shape:
        raise ValueError(f"images {x.shape} and reference {y.shape} must have the same shape")
    if x.dtype != np.uint8 or y.dtype != np.uint8 or x.ndim not in (3, 4):
        raise ValueError(f"expected uint8 images (N, H, W[, C]), got {x.dtype}/{y.dtype} {x.shape}")
    if x.ndim == 3:
        x, y = x[..., None], y[..., None]
    return x.astype(np.float64), y.astype(np.float64)


def psnr_cap(values_per_image: int) -> float:
    """The PSNR an image identical to its reference is given: ``10 log10(255² · P)`` dB.

    ``P`` is the number of values in an image (H·W·C). That is the PSNR of the smallest error a
    uint8 image can have, one value off by one level (MSE = 1/P): 70.97 dB for the testbed's
    8×8×3, 101.1 dB for 256×256×3. Every non-identical image scores at most this, so the cap
    never reorders images and keeps means finite.
    """
    return float(10.0 * np.log10(DATA_RANGE**2 * values_per_image))


def psnr(images: np.ndarray, reference: np.ndarray, per_image: bool = False) -> float | np.ndarray:
    """Peak signal-to-noise ratio ``10 log10(255² / MSE)`` per image, then the mean.

    An image identical to its reference (MSE 0, PSNR infinite) gets :func:`psnr_cap` instead, so
    the mean over a run stays finite and comparable; count such images with :func:`identical`.
    """
    x, y = _pair(images, reference)
    values_per_image = x.shape[1] * x.shape[2] * x.shape[3]
    mse = ((x - y) ** 2).mean(axis=(1, 2, 3))
    mse = np.maximum(mse, 1.0 / values_per_image)  # identical: the smallest non-zero error, see psnr_cap
    values = 10.0 * np.log10(DATA_RANGE**2 / mse)
    return values if per_image else float(values.mean())


def identical(images: np.ndarray, reference: np.ndarray) -> int:
    """How many images equal their reference exactly (each scores :func:`psnr_cap`)."""
    x, y = np.asarray(images), np.asarray(reference)
    if x.shape != y.shape:
        raise ValueError(f"images {x.shape} and reference {y.shape} must have the same shape")
    return int((x.reshape(len(x), -1) == y.reshape(len(y), -1)).all(axis=1).sum())


def ssim_window(height: int, width: int) -> tuple[int, float]:
    """(window size, sigma) for an image: 11 and 1.5, or the largest odd size that fits."""
    size = min(SSIM_WINDOW, min(height, width) - (1 - min(height, width) % 2))
    if size < 3:
        raise ValueError(f"SSIM needs images of at least 3x3, got {height}x{width}")
    return size, SSIM_SIGMA * size / SSIM_WINDOW


def ssim(images: np.ndarray, reference: np.ndarray, per_image: bool = False) -> float | np.ndarray:
    """Mean SSIM (Wang et al. 2004) per image, averaged over channels, then over images."""
    x, y = _pair(images, reference)
    size, sigma = ssim_window(x.shape[1], x.shape[2])

    def blur(a: np.ndarray) -> np.ndarray:
        return gaussian_filter(a, sigma=(0, sigma, sigma, 0), truncate=SSIM_TRUNCATE, mode="reflect")

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    pad = (size - 1) // 2
    values = ssim_map[:, pad : x.shape[1] - pad, pad : x.shape[2] - pad, :].mean(axis=(1, 2, 3))
    return values if per_image else float(values.mean())
