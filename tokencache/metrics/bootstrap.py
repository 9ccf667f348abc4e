"""Bootstrap confidence intervals over samples, and paired intervals of differences.

A run's metric is a statistic of its N samples. Its uncertainty from having drawn only N is
estimated by the bootstrap: draw N sample indices with replacement, recompute the metric on
that resample — for FID-like metrics the sample statistics (mean, covariance, manifold radii,
kernel sums) are recomputed, the reference stays fixed — and repeat ``resamples`` times. The 95%
interval is the 2.5th and 97.5th percentile of the resampled values (the percentile interval).

The interval reported is the percentile interval of the resampled values re-centred on the
point estimate (:func:`interval`): see the note on FID-like metrics below.

The resampled index sets depend only on ``(seed, N, resamples)``, so every run of the same size
is resampled with the same sets. Runs that share noise and labels sample by sample (every method
and its ``full`` run: sample i draws its label and noise from ``(seed, i)``) are therefore paired:
the difference of two runs' values on the same resample, over all resamples, gives a *paired*
interval of their difference (:func:`paired_interval`), much narrower than the two marginal
intervals because the sample-to-sample variation they share cancels.

Everything is vectorised over resamples through each resample's index counts ``c`` (how often
each sample was drawn): weighted means and covariances for FID and sFID, with the Fréchet
distance's ``Tr sqrtm(S_b S_ref)`` from the eigenvalues of ``A S_b A`` (``A = sqrtm(S_ref)``,
computed once; with fewer samples than feature dimensions, of an N × N Gram matrix instead); count-weighted sums for IS, precision, class consistency, PSNR and SSIM; recall
recomputes each resample's sample-manifold radii (a copy drawn twice is its own nearest
neighbour at distance 0, as it would be for the resampled set itself); KID uses clean-fid's
unbiased estimator with the same reference subsets as the point estimate. Recall and KID need
sample-by-sample matrices and are resampled up to :data:`MAX_PAIRWISE` samples (the testbed);
above that their intervals are left out (None).

Note on FID-like metrics: they depend on N (FID is biased upward at finite N) and a resample
holds only ~63% of distinct samples, so resampled FIDs (sFIDs, KIDs) sit above the point estimate
and resampled recalls below it (a duplicate is its own nearest neighbour, which shrinks the
manifold radii): on the testbed FID by +1.4, sFID by +0.12, recall by −0.05 in the median, and
the plain percentile interval of sFID missed its own estimate. :func:`interval` therefore
re-centres the resampled values on the estimate (subtracting that median shift) before taking
percentiles; the shift is reported with every interval. In differences between paired runs the
shifts cancel (the median of the paired differences was within 0.03 FID of the difference of
the estimates), and those differences are what the tables test.
"""
from __future__ import annotations

import hashlib
import threading
from typing import Optional

import numpy as np
import torch

#: resamples by default: the 2.5% and 97.5% percentiles then rest on 25 values in each tail
DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
CONFIDENCE = 0.95
#: recall and KID are resampled only up to this many samples (sample × sample matrices)
MAX_PAIRWISE = 5000
#: clean-fid's KID: subsets of min(N, N_ref, KID_MAX_SUBSET) samples, KID_SUBSETS of them
KID_SUBSETS = 100
KID_MAX_SUBSET = 1000
KID_SEED = 0
#: sorted neighbours searched first for a resample's k-NN radius (all of them when that is not enough)
NEAREST = 32
#: held while clean-fid's KID uses NumPy's global RNG
_GLOBAL_RNG_LOCK = threading.Lock()
#: largest N × r² (float64 values) for which all outer products are kept at once (256 MB)
OUTER_LIMIT = 32 << 20


def resample_indices(n: int, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> np.ndarray:
    """(resamples, n) sample indices drawn with replacement; a function of (seed, n, resamples) only."""
    if n < 2 or resamples < 2:
        raise ValueError(f"the bootstrap needs at least 2 samples and 2 resamples, got {n} and {resamples}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(n)]))
    return rng.integers(0, n, size=(int(resamples), int(n)))


def index_counts(indices: np.ndarray, n: int) -> np.ndarray:
    """(resamples, n) float64: how often each sample is drawn in each resample."""
    rows = np.repeat(np.arange(len(indices)), indices.shape[1])
    counts = np.zeros((len(indices), n), dtype=np.float64)
    np.add.at(counts, (rows, indices.reshape(-1)), 1.0)
    return counts


def indices_digest(indices: np.ndarray) -> str:
    """sha256 of the index sets (stored with the values, checked before two runs are paired)."""
    return hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()


def percentile_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> Optional[list[float]]:
    """[low, high]: the (1 − confidence)/2 and (1 + confidence)/2 percentiles of the finite values."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return None
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return [float(low), float(high)]


def resampling_bias(values: np.ndarray, point: float) -> Optional[float]:
    """Median of the resampled values minus the point estimate (the resampling's own shift)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) < 2 or point is None or not np.isfinite(point):
        return None
    return float(np.median(values) - point)


def interval(values: np.ndarray, point: Optional[float], confidence: float = CONFIDENCE) -> Optional[list[float]]:
    """The 95% interval reported: the percentile interval of the values re-centred on ``point``.

    Each resampled value is shifted by the resampling bias (:func:`resampling_bias`), so the
    interval keeps the bootstrap's spread and skew but is placed around the point estimate. For
    unbiased statistics (precision, class consistency, mean PSNR/SSIM) the shift is ~0 and this
    is the plain percentile interval; for FID, sFID, KID and recall, which a resample's
    duplicates move (a resample holds ~63% distinct samples), the plain interval can miss its
    own estimate (sFID 0.969 had [0.987, 1.208] on the testbed).
    """
    bias = resampling_bias(values, point)
    if bias is None:
        return None
    return percentile_interval(np.asarray(values, dtype=np.float64) - bias, confidence)


def paired_interval(values: np.ndarray, reference_values: np.ndarray, point: Optional[float] = None,
                    confidence: float = CONFIDENCE) -> Optional[list[float]]:
    """95% interval of ``values − reference_values`` resample by resample (same index sets).

    ``point``: the difference of the two point estimates, on which the interval is re-centred as
    in :func:`interval` (the shift is small: the two runs' resampling biases mostly cancel).
    """
    values, reference_values = np.asarray(values, np.float64), np.asarray(reference_values, np.float64)
    if values.shape != reference_values.shape:
        raise ValueError(f"paired bootstrap values differ in shape: {values.shape} vs {reference_values.shape}")
    difference = values - reference_values
    return percentile_interval(difference) if point is None else interval(difference, point, confidence)


# ---------------------------------------------------------------------------------- per metric


def weighted_mean(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Each resample's mean of a per-sample quantity (N,) → (resamples,)."""
    return counts @ np.asarray(values, dtype=np.float64) / counts.shape[1]


def frechet_values(features: np.ndarray, counts: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray,
                   device: str | torch.device = "cpu", chunk: int = 500, method: str = "auto") -> np.ndarray:
    """Fréchet distance of each resample's Gaussian (count-weighted mean, unbiased covariance) to the reference.

    ``method``: ``"basis"`` (below), ``"gram"`` (:func:`_frechet_values_gram`: N × N per resample,
    no D × D decomposition) or ``"auto"``: the Gram form when there are fewer samples than feature
    dimensions (a proxy FID-N on Inception features), else the basis form.

    ``Tr sqrtm(S S_ref)`` is the sum of the square roots of the eigenvalues of ``Aᵀ S A`` with
    ``A = V_r diag(√λ_r)`` from the reference covariance's eigen-decomposition (its r non-zero
    eigenvalues): ``S S_ref`` has the same non-zero eigenvalues, and ``Aᵀ S A`` is symmetric and
    r × r, so one batched ``eigvalsh`` replaces a non-symmetric ``sqrtm`` per resample. The
    resamples' second moments in that basis are one matrix product (counts × outer products).
    """
    if method not in ("auto", "basis", "gram"):
        raise ValueError(f"method must be auto, basis or gram, got {method!r}")
    n, dim = np.shape(features)
    if method == "gram" or (method == "auto" and n <= dim):
        return _frechet_values_gram(features, counts, mu_ref, sigma_ref, device, chunk)
    device = torch.device(device)
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64, device=device)
    x = x - x.mean(dim=0)  # centred once (better conditioned sums); the offset comes back in the means
    offset = torch.as_tensor(np.asarray(features, dtype=np.float64).mean(axis=0), device=device)
    mu_ref_t = torch.as_tensor(np.asarray(mu_ref), dtype=torch.float64, device=device)
    sigma_ref_t = torch.as_tensor(np.asarray(sigma_ref), dtype=torch.float64, device=device)
    vals, vecs = torch.linalg.eigh(sigma_ref_t)
    keep = vals > vals.max().clamp(min=0) * 1e-12
    basis = vecs[:, keep] * vals[keep].sqrt()                                            # A, (D, r)
    y = x @ basis                                                                         # (n, r)
    r = y.shape[1]
    # the resamples' second moments: one product with all outer products when they fit in memory
    # (the testbed: 200 × 99² values), else one (r × n)(n × r) product per resample (Inception at 50K)
    outer = (y[:, :, None] * y[:, None, :]).reshape(n, r * r) if n * r * r <= OUTER_LIMIT else None
    sq_norm = (x * x).sum(dim=1)                                                          # |x_i|²
    trace_ref = torch.trace(sigma_ref_t)
    out = []
    for lo in range(0, len(counts), chunk):
        c = torch.as_tensor(counts[lo:lo + chunk], dtype=torch.float64, device=device)  # (b, n)
        mean_x = c @ x / n                                                                # (b, D), centred
        mean_y = mean_x @ basis                                                           # (b, r)
        if outer is not None:
            second = (c @ outer).reshape(-1, r, r)                                        # Σ c_i y_i y_iᵀ
        else:
            second = torch.stack([(y * w[:, None]).T @ y for w in c])
        cov_y = (second - n * mean_y[:, :, None] * mean_y[:, None, :]) / (n - 1)         # Aᵀ S_b A
        tr_sqrt = torch.linalg.eigvalsh(cov_y).clamp(min=0).sqrt().sum(dim=1)
        trace = (c @ sq_norm - n * (mean_x * mean_x).sum(dim=1)) / (n - 1)               # Tr S_b
        diff = mean_x + offset - mu_ref_t
        out.append((diff * diff).sum(dim=1) + trace + trace_ref - 2.0 * tr_sqrt)
    return torch.cat(out).cpu().numpy()


def _frechet_values_gram(features, counts, mu_ref, sigma_ref, device, chunk) -> np.ndarray:
    """:func:`frechet_values` through the samples' Gram matrix, for N ≤ D.

    With X the centred features and Q_b = I − 1cᵀ/N (a resample's centring), the resample's
    covariance is S_b = Xᵀ Q_bᵀ C Q_b X / (N − 1), C = diag(c); S_b S_ref has the non-zero
    eigenvalues of the symmetric N × N matrix C^½ Q_b G Q_bᵀ C^½ / (N − 1) with G = X S_ref Xᵀ,
    computed once. So each resample costs an N × N ``eigvalsh`` and no D × D decomposition is needed.
    """
    device = torch.device(device)
    feats = np.asarray(features, dtype=np.float64)
    x = torch.as_tensor(feats - feats.mean(axis=0), device=device)
    offset = torch.as_tensor(feats.mean(axis=0), device=device)
    n = x.shape[0]
    sigma_ref_t = torch.as_tensor(np.asarray(sigma_ref, dtype=np.float64), device=device)
    mu_ref_t = torch.as_tensor(np.asarray(mu_ref, dtype=np.float64), device=device)
    gram = x @ sigma_ref_t @ x.T                                                          # G (N, N)
    gram = (gram + gram.T) / 2
    sq_norm = (x * x).sum(dim=1)
    trace_ref = torch.trace(sigma_ref_t)
    step = max(1, min(chunk, OUTER_LIMIT // max(1, n * n)))
    out = []
    for lo in range(0, len(counts), step):
        c = torch.as_tensor(counts[lo:lo + step], dtype=torch.float64, device=device)    # (b, N)
        g = c @ gram                                                                      # G c (b, N)
        s = (g * c).sum(dim=1)                                                            # cᵀ G c
        centred = gram[None] - (g[:, None, :] + g[:, :, None]) / n + s[:, None, None] / (n * n)
        root_c = c.sqrt()
        m = root_c[:, :, None] * centred * root_c[:, None, :] / (n - 1)
        tr_sqrt = torch.linalg.eigvalsh(m).clamp(min=0).sqrt().sum(dim=1)
        mean_x = c @ x / n
        trace = (c @ sq_norm - n * (mean_x * mean_x).sum(dim=1)) / (n - 1)
        diff = mean_x + offset - mu_ref_t
        out.append((diff * diff).sum(dim=1) + trace + trace_ref - 2.0 * tr_sqrt)
    return torch.cat(out).cpu().numpy()


def inception_score_values(probs: np.ndarray, indices: np.ndarray, counts: np.ndarray,
                           split_size: int = 5000) -> np.ndarray:
    """IS (ADM: mean over consecutive splits of exp E KL(p(y|x) || p(y))) of each resample."""
    p = np.asarray(probs, dtype=np.float64)
    n = len(p)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)                          # (N,)
    if n <= split_size:
        marginal = counts @ p / n                                                         # (b, K)
        with np.errstate(divide="ignore", invalid="ignore"):
            mlogm = np.where(marginal > 0, marginal * np.log(marginal), 0.0).sum(axis=1)
        return np.exp(counts @ plogp / n - mlogm)
    out = np.empty(len(indices))
    for b, rows in enumerate(indices):  # splits follow the resampled order, as ADM's follow the file's
        scores = []
        for lo in range(0, n, split_size):
            part = rows[lo:lo + split_size]
            marginal = p[part].mean(axis=0)
            with np.errstate(divide="ignore", invalid="ignore"):
                mlogm = np.where(marginal > 0, marginal * np.log(marginal), 0.0).sum()
            scores.append(np.exp(plogp[part].mean() - mlogm))
        out[b] = np.mean(scores)
    return out


def precision_recall_values(ref_features: np.ndarray, sample_features: np.ndarray, counts: np.ndarray,
                            k: int = 3, chunk: int = 50) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Improved precision and recall (ADM's definitions, float32 distances) of each resample.

    Precision only moves with the counts (the reference manifold is fixed). Recall needs each
    resample's own sample-manifold radii: the distance to the k-th nearest of the resampled
    points, a point drawn m times having m − 1 neighbours at distance 0. Recall is None above
    :data:`MAX_PAIRWISE` samples.
    """
    from tokencache.metrics.fid import _squared_distances, manifold_radii

    ref = torch.as_tensor(ref_features, dtype=torch.float32)
    smp = torch.as_tensor(sample_features, dtype=torch.float32)
    n = len(smp)
    ref_radii = manifold_radii(ref, k)
    inside_ref = np.zeros(n, dtype=np.float64)
    for lo in range(0, n, 2048):
        d = _squared_distances(smp[lo:lo + 2048], ref, torch.float32)
        inside_ref[lo:lo + 2048] = (d <= ref_radii[None, :]).any(dim=1).double().numpy()
    precision = weighted_mean(inside_ref, counts)
    if n > MAX_PAIRWISE:
        return precision, None
    d_ss = _squared_distances(smp, smp, torch.float32).numpy()                           # (N, N)
    d_rs = _squared_distances(ref, smp, torch.float32)                                    # (R, N)
    order = np.argsort(d_ss, axis=1, kind="stable")
    d_sorted = np.take_along_axis(d_ss, order, axis=1)
    near = min(n, NEAREST)  # the radius is almost always among the nearest few: look there first
    recall = np.empty(len(counts))
    for lo in range(0, len(counts), chunk):
        c = counts[lo:lo + chunk]                                                         # (b, N)
        along = np.cumsum(c[:, order[:, :near]], axis=2)                                  # (b, N, near)
        if near < n and (along[..., -1] < k + 1).any():  # some radius lies further out: all neighbours
            along = np.cumsum(c[:, order], axis=2)
        position = np.argmax(along >= k + 1, axis=2)                                      # (b, N)
        radii = np.take_along_axis(d_sorted[None, :, :along.shape[2]], position[..., None], axis=2)[..., 0]
        radii = np.where(c > 0, radii, -np.inf)                                           # absent: covers nothing
        covered = (d_rs[None, :, :] <= torch.as_tensor(radii, dtype=torch.float32)[:, None, :]).any(dim=2)
        recall[lo:lo + chunk] = covered.double().mean(dim=1).numpy()
    return precision, recall


def kid(sample_features: np.ndarray, ref_features: np.ndarray, subsets: int = KID_SUBSETS,
        max_subset: int = KID_MAX_SUBSET, seed: int = KID_SEED) -> float:
    """KID by clean-fid's ``kernel_distance`` (cubic polynomial kernel, unbiased MMD²), seeded.

    clean-fid draws its subsets from NumPy's global RNG; it is seeded here and restored after,
    under a lock, so the value is reproducible even when several evaluations run in threads of
    one process (the workflow's in-process jobs: without the lock they interleaved their draws,
    and KID moved by up to 2% between identical runs), and the caller's RNG is left untouched.
    """
    from cleanfid.fid import kernel_distance

    with _GLOBAL_RNG_LOCK:
        state = np.random.get_state()
        try:
            np.random.seed(seed)
            return float(kernel_distance(np.asarray(sample_features, np.float64),
                                         np.asarray(ref_features, np.float64),
                                         num_subsets=subsets, max_subset_size=max_subset))
        finally:
            np.random.set_state(state)


def kid_values(sample_features: np.ndarray, ref_features: np.ndarray, counts: np.ndarray,
               subsets: int = KID_SUBSETS, max_subset: int = KID_MAX_SUBSET, seed: int = KID_SEED) -> Optional[np.ndarray]:
    """clean-fid's KID of each resample, with the reference subsets of :func:`kid` (same seed).

    With subsets of all N samples (N ≤ N_ref and N ≤ ``max_subset``: the testbed) clean-fid's
    estimate on a resample is exactly ``[mean_s K_rr(s) + K_ss(c)] / (m(m − 1)) − 2 c·w / m²``:
    ``K_ss(c)`` the kernel sum over pairs of distinct positions of the resample, ``w`` each
    sample's mean kernel sum against the reference subsets. With smaller subsets (N larger) the
    random sample subsets are replaced by their expectation. None above :data:`MAX_PAIRWISE`.
    """
    x = np.asarray(ref_features, np.float64)
    y = np.asarray(sample_features, np.float64)
    n, n_ref, dim = len(y), len(x), y.shape[1]
    if n > MAX_PAIRWISE:
        return None
    m = min(n, n_ref, max_subset)
    # the subsets clean-fid draws after np.random.seed(seed): per subset, reference positions first,
    # then sample positions (a private RandomState with the same seed gives the same draws)
    draws = np.random.RandomState(seed)
    ref_subsets = []
    for _ in range(subsets):
        ref_subsets.append(draws.choice(n_ref, m, replace=False))
        draws.choice(n, m, replace=False)
    k_ss = (y @ y.T / dim + 1) ** 3
    k_sr = (y @ x.T / dim + 1) ** 3
    k_rr_terms, cross = [], np.zeros(n)
    for rows in ref_subsets:
        sub = (x[rows] @ x[rows].T / dim + 1) ** 3
        k_rr_terms.append(sub.sum() - np.trace(sub))
        cross += k_sr[:, rows].sum(axis=1)
    cross /= subsets
    k_rr = float(np.mean(k_rr_terms))
    pairs = np.einsum("bi,ij,bj->b", counts, k_ss, counts) - counts @ np.diag(k_ss)      # distinct positions
    scale = (m * (m - 1)) / (n * (n - 1))                                                 # expected subset share
    return (k_rr + scale * pairs) / (m * (m - 1)) - 2.0 * (counts @ cross) * (m / n) / (m * m)
