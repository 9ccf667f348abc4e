"""Sample and reference batches in the ADM evaluator's npz format.

Samples: ``arr_0`` uint8 (N, H, W, 3) images, ``arr_1`` int64 (N,) class labels, as written by
guided-diffusion's and DiT's sampling scripts. Reference batches (e.g. ADM's
``VIRTUAL_imagenet256_labeled.npz``): ``mu``/``sigma`` (pool features) and ``mu_s``/``sigma_s``
(spatial features) statistics plus the images in ``arr_0`` for precision/recall. Batches written
here also store ``extractor`` (the feature extractor name) so statistics from one extractor are
never compared with features of another.

Writes are atomic (temporary file in the same directory, then ``os.replace``): an interrupted
run never leaves a truncated npz that a later evaluation would read.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

REFERENCE_KEYS = ("mu", "sigma", "mu_s", "sigma_s", "arr_0", "extractor")


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (reference batches are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_savez(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected uint8 images (N, H, W, C) with C in (1, 3), got {images.dtype} {images.shape}")
    return images


def save_samples_npz(path: str | os.PathLike, images_uint8: np.ndarray, labels: np.ndarray | None = None) -> None:
    """Write samples as ADM does: ``arr_0`` images (N, H, W, C) uint8, ``arr_1`` labels if given."""
    images = _check_images(images_uint8)
    arrays = {"arr_0": images}
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        arrays["arr_1"] = labels
    _atomic_savez(path, arrays)


def load_samples_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Read ``(images, labels)`` from a samples npz; labels are None when ``arr_1`` is absent."""
    with np.load(path) as data:
        if "arr_0" not in data.files:
            raise ValueError(f"{path} has no arr_0 images: not an ADM sample batch")
        images = _check_images(data["arr_0"])
        labels = data["arr_1"] if "arr_1" in data.files else None
    return images, labels


def load_reference_batch(path: str | os.PathLike) -> dict[str, np.ndarray | str]:
    """Read a reference batch: whichever of mu, sigma, mu_s, sigma_s, arr_0, extractor it holds."""
    with np.load(path) as data:
        ref = {key: data[key] for key in REFERENCE_KEYS if key in data.files}
    if "extractor" in ref:
        ref["extractor"] = str(ref["extractor"])
    if "arr_0" not in ref and "mu" not in ref:
        raise ValueError(f"{path} holds neither statistics (mu, sigma) nor images (arr_0): not a reference batch")
    return ref


def save_reference_batch(
    path: str | os.PathLike,
    images_uint8: np.ndarray,
    extractor: str = "inception",
    weights_path: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str | None = None,
) -> dict[str, np.ndarray]:
    """Write a reference batch like ADM's: pool and spatial statistics of the images, and the images.

    Returns the statistics written (``mu``, ``sigma``, ``mu_s``, ``sigma_s``).
    """
    from tokencache.metrics.features import extract_features
    from tokencache.metrics.fid import feature_statistics

    images = _check_images(images_uint8)
    feats = extract_features(images, extractor, batch_size=batch_size, weights_path=weights_path, device=device)
    mu, sigma = feature_statistics(feats["pool"])
    mu_s, sigma_s = feature_statistics(feats["spatial"])
    stats = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
    name = extractor if isinstance(extractor, str) else extractor.name
    _atomic_savez(path, {**stats, "arr_0": images, "extractor": np.array(name)})
    return stats
