"""The ADM evaluator's distribution metrics, on features already extracted.

Definitions follow openai/guided-diffusion ``evaluations/evaluator.py`` (the evaluator behind the
FID/sFID/IS/precision/recall numbers of ADM, DiT and the caching papers built on them), so a number
computed here means the same thing as a number in those tables when the features are the same.

- Fréchet distance (Heusel et al. 2017, TTUR code):
  ``||mu1 - mu2||² + Tr(S1) + Tr(S2) - 2 Tr(sqrtm(S1 S2))``.
- Inception score (Salimans et al. 2016, improved-gan code): ``exp(E_x KL(p(y|x) || p(y)))`` per
  split of consecutive samples, averaged over splits.
- Improved precision and recall (Kynkäänniemi et al. 2019): a point lies on a set's manifold if it
  falls inside the k-NN ball of at least one member of that set.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg
from scipy.special import rel_entr

# ADM: "numerical error might give slight imaginary component"; tolerated on the diagonal up to this.
IMAGINARY_ATOL = 1e-3


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (``np.cov(rowvar=False)``, unbiased) of (N, D) features, in float64."""
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"feature_statistics needs (N >= 2, D) features, got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    """``scipy.linalg.sqrtm`` without its warnings.

    ADM calls it with ``disp=False`` only to silence it (the error estimate it then returns is
    discarded); SciPy >= 1.16 deprecates ``disp``, so the same result is taken with warnings muted.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return linalg.sqrtm(matrix)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2), as ADM computes it.

    The product ``sigma1 @ sigma2`` may be singular (fewer samples than dimensions, dead features);
    when its square root is not finite, ADM adds ``eps`` to both diagonals and retries. A small
    imaginary part from round-off is dropped; one above 1e-3 on the diagonal means the statistics
    are broken and raises.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"singular covariance product in the Fréchet distance; adding {eps} to the diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAGINARY_ATOL):
            raise ValueError(f"Fréchet distance: imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrtm")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_distance_of_features(features: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                                 sqrtm: str = "auto") -> tuple[float, str]:
    """Fréchet distance of (N, D) features' Gaussian to ``N(mu2, sigma2)``, and how its root was taken.

    ``sqrtm="scipy"`` is ADM's computation (:func:`frechet_distance`, ``scipy.linalg.sqrtm`` of the
    D × D product). ``"auto"`` (the default) takes it whenever the samples span the feature space
    (N > D, e.g. FID-50K on 2048-d Inception features), and otherwise uses an exact identity: with
    ``X`` the centred features, ``S1 = XᵀX / (N−1)`` and ``S1 S2`` has the same non-zero eigenvalues
    as the symmetric N × N matrix ``X S2 Xᵀ / (N−1)``, so ``Tr sqrtm(S1 S2)`` is the sum of the
    square roots of its ``eigvalsh``. For N ≤ D the product is singular, the case where a Schur
    square root of a 2048 × 2048 matrix costs ~25 CPU-seconds per call and is the less accurate of
    the two; the two agree to ~1e-7 relative (tests). ADM's retry with ``eps`` on the diagonals is
    for a non-finite Schur root and never arises here. Returns ``(value, "scipy" | "gram")``.
    """
    feats = np.asarray(features, dtype=np.float64)
    if sqrtm not in ("auto", "scipy"):
        raise ValueError(f"sqrtm must be 'auto' or 'scipy', got {sqrtm!r}")
    n, dim = feats.shape if feats.ndim == 2 else (0, 0)
    if sqrtm == "scipy" or n > dim:
        return frechet_distance(*feature_statistics(feats), mu2, sigma2), "scipy"
    mu1, _ = feature_statistics(feats)  # validates the shape
    mu2, sigma2 = np.asarray(mu2, np.float64), np.asarray(sigma2, np.float64)
    if mu2.shape != (dim,) or sigma2.shape != (dim, dim):
        raise ValueError(f"statistics do not match: features are {dim}-d, mu {mu2.shape}, sigma {sigma2.shape}")
    centred = feats - mu1
    gram = centred @ sigma2 @ centred.T / (n - 1)
    eigenvalues = np.linalg.eigvalsh((gram + gram.T) / 2.0)
    trace_root = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = mu1 - mu2
    trace1 = float((centred * centred).sum() / (n - 1))
    return float(diff.dot(diff) + trace1 + np.trace(sigma2) - 2.0 * trace_root), "gram"


def inception_score(probs: np.ndarray, split_size: int = 5000) -> float:
    """Mean over consecutive splits of ``exp(mean_x KL(p(y|x) || p(y)))``; ADM reports only the mean.

    Splits are taken in sample order, without shuffling, as ADM does (so the score of a fixed
    sample file is reproducible). ``0 log 0`` is taken as 0, its limit; ADM's formula would give
    NaN for a probability that underflowed to exactly zero.
    """
    preds = np.asarray(probs, dtype=np.float64)
    if preds.ndim != 2 or len(preds) == 0:
        raise ValueError(f"inception_score needs (N, classes) probabilities, got shape {preds.shape}")
    scores = []
    for start in range(0, len(preds), split_size):
        part = preds[start : start + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        kl = rel_entr(part, marginal).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _squared_distances(u: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Pairwise squared Euclidean distances ``max(|u|² - 2 u·v + |v|², 0)``, ADM's distance block.

    ADM evaluates the block in float16 and falls back to float32 where that overflows; with
    ``dtype=torch.float16`` the same is done here.
    """
    def block(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        norm_a = (a * a).sum(dim=1, keepdim=True)
        norm_b = (b * b).sum(dim=1, keepdim=True).T
        return torch.clamp(norm_a - 2.0 * (a @ b.T) + norm_b, min=0.0)

    dist = block(u.to(dtype), v.to(dtype))
    if dtype != torch.float32 and not torch.isfinite(dist).all():
        dist = block(u.float(), v.float())
    return dist.float()


def manifold_radii(
    features: np.ndarray | torch.Tensor,
    k: int = 3,
    row_batch_size: int = 2048,
    col_batch_size: int = 10000,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Distance (squared) of every point to its k-th nearest neighbour within the same set.

    The point itself is at distance 0 and sorts first, so the k-th neighbour is the entry at
    index k of the sorted row, exactly ADM's ``np.partition(..., k)[:, k]``. Rows are processed
    in blocks (``row_batch_size`` x N distances in memory at a time).
    """
    feats = torch.as_tensor(features, dtype=torch.float32, device=device)
    if k >= len(feats):
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set, got {len(feats)}")
    radii = torch.empty(len(feats), dtype=torch.float32, device=device)
    dist = torch.empty(min(row_batch_size, len(feats)), len(feats), dtype=torch.float32, device=device)
    for r0 in range(0, len(feats), row_batch_size):
        rows = feats[r0 : r0 + row_batch_size]
        for c0 in range(0, len(feats), col_batch_size):
            dist[: len(rows), c0 : c0 + col_batch_size] = _squared_distances(rows, feats[c0 : c0 + col_batch_size], dtype)
        radii[r0 : r0 + len(rows)] = torch.kthvalue(dist[: len(rows)], k + 1, dim=1).values
    return radii


def precision_recall(
    ref_features: np.ndarray,
    sample_features: np.ndarray,
    k: int = 3,
    row_batch_size: int = 2048,
    col_batch_size: int = 10000,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) as ADM's ``ManifoldEstimator``.

    precision = fraction of samples inside the reference manifold (some reference point's k-NN
    ball, squared distance ``<=`` its radius); recall = fraction of reference points inside the
    sample manifold. ADM's defaults: k = 3, no radius clamping (``clamp_to_percentile=None``);
    its ``eps`` only enters the realism score, which is not reported. ADM computes distance blocks
    in float16 (float32 fallback); the default here is float32 throughout, ``dtype=torch.float16``
    reproduces ADM's rounding. Blocks of ``row_batch_size`` x ``col_batch_size`` distances keep
    50,000 x 50,000 within memory.
    """
    ref = torch.as_tensor(ref_features, dtype=torch.float32, device=device)
    smp = torch.as_tensor(sample_features, dtype=torch.float32, device=device)
    if ref.ndim != 2 or smp.ndim != 2 or ref.shape[1] != smp.shape[1]:
        raise ValueError(f"precision_recall needs (N, D) features of equal D, got {tuple(ref.shape)} and {tuple(smp.shape)}")
    batching = dict(row_batch_size=row_batch_size, col_batch_size=col_batch_size, device=device, dtype=dtype)
    ref_radii = manifold_radii(ref, k, **batching)
    smp_radii = manifold_radii(smp, k, **batching)
    sample_in_ref = torch.zeros(len(smp), dtype=torch.bool, device=device)
    ref_in_sample = torch.zeros(len(ref), dtype=torch.bool, device=device)
    for r0 in range(0, len(smp), row_batch_size):
        rows = smp[r0 : r0 + row_batch_size]
        for c0 in range(0, len(ref), col_batch_size):
            dist = _squared_distances(rows, ref[c0 : c0 + col_batch_size], dtype)
            sample_in_ref[r0 : r0 + len(rows)] |= (dist <= ref_radii[c0 : c0 + col_batch_size][None, :]).any(dim=1)
            ref_in_sample[c0 : c0 + col_batch_size] |= (dist <= smp_radii[r0 : r0 + len(rows)][:, None]).any(dim=0)
    return float(sample_in_ref.double().mean()), float(ref_in_sample.double().mean())
