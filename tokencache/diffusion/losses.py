"""Gaussian KL and discretised log-likelihood terms of the variational bound.

These are the pieces of L_vlb (Ho et al. eq. 5; Nichol & Dhariwal sec. 3.1):
L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 1 and the
decoder term L_0 = -log p(x_0 | x_1) on 8-bit data scaled to [-1, 1].
"""
from __future__ import annotations

import numpy as np
import torch


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch one: one loss value per sample."""
    return tensor.mean(dim=list(range(1, len(tensor.shape))))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

    Arguments broadcast; scalars are allowed as long as one argument is a tensor
    (the prior term compares against the standard normal as plain ``0.0``).
    """
    reference = next(
        (obj for obj in (mean1, logvar1, mean2, logvar2) if isinstance(obj, torch.Tensor)),
        None,
    )
    if reference is None:
        raise TypeError("at least one argument of normal_kl must be a Tensor")
    # torch.exp needs tensors; broadcasting alone would not convert a float.
    logvar1, logvar2 = (
        v if isinstance(v, torch.Tensor) else torch.tensor(v).to(reference)
        for v in (logvar1, logvar2)
    )
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + ((mean1 - mean2) ** 2) * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) by the tanh approximation used throughout ADM (same as tanh-GELU)."""
    return 0.5 * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """log p(x_0 | x_1) with each pixel a bin of width 2/255 in [-1, 1], in nats.

    The outermost bins extend to -inf / +inf, as in Ho et al. sec. 3.3, so the
    likelihood of an 8-bit image is a proper probability. ``log_scales`` is
    log(sigma), i.e. half the log-variance.
    """
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError("x, means and log_scales must have the same shape")
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta),
    )
