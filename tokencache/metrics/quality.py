"""Sample quality against a reference batch: FID, sFID, IS, precision, recall (ADM evaluator).

``evaluate_quality`` reads a sample batch and a reference batch (ADM npz format), extracts
features with one extractor (``"inception"`` for ImageNet, ``"digits"`` for the testbed) and
returns a JSON-serialisable record. It follows PROTOCOL.md: reference statistics are taken from
the npz when present (as ADM does), the reference file's sha256 and the extractor's weights are
recorded, and a result on fewer than 50,000 samples is labelled with its size (``FID-5K`` is a
proxy, not comparable with FID-50K).
"""
from __future__ import annotations

import os

import numpy as np

from tokencache.data.npz import load_reference_batch, load_samples_npz, sha256_file
from tokencache.metrics.fid import feature_statistics, frechet_distance, inception_score, precision_recall

FULL_EVAL_SIZE = 50_000


def sample_count_label(n: int) -> str:
    """``50000 → "50K"``, ``5000 → "5K"``, ``450 → "450"``."""
    return f"{n // 1000}K" if n >= 1000 and n % 1000 == 0 else str(n)


def _reference_stats(reference: dict, extractor, batch_size: int, device) -> tuple[dict, np.ndarray | None]:
    """Reference statistics (from the npz, else from its images) and its pool features if it has images."""
    from tokencache.metrics.features import extract_features

    pool = None
    stats = {key: reference[key] for key in ("mu", "sigma", "mu_s", "sigma_s") if key in reference}
    if "arr_0" in reference:
        feats = extract_features(reference["arr_0"], extractor, batch_size=batch_size, device=device)
        pool = feats["pool"]
        if "mu" not in stats:
            stats["mu"], stats["sigma"] = feature_statistics(feats["pool"])
        if "mu_s" not in stats:
            stats["mu_s"], stats["sigma_s"] = feature_statistics(feats["spatial"])
    return stats, pool


def evaluate_quality(
    samples: str | os.PathLike | np.ndarray,
    reference_path: str | os.PathLike,
    features: str = "inception",
    weights_path: str | os.PathLike | None = None,
    labels: np.ndarray | None = None,
    batch_size: int = 64,
    device: str | None = None,
    k: int = 3,
) -> dict:
    """FID, sFID, IS, precision and recall of ``samples`` against the reference batch.

    ``samples`` is a sample npz path or a uint8 (N, H, W, C) array. ``labels`` (default: the
    npz's ``arr_1``) add class consistency when the extractor's classifier predicts those labels
    (the digits evaluator). Precision/recall need the reference images (``arr_0``); they are
    None for a statistics-only reference, as is sFID for a reference without ``mu_s``.
    """
    from tokencache.metrics.digits_evaluator import class_consistency
    from tokencache.metrics.features import extract_features, load_extractor

    if isinstance(samples, (str, os.PathLike)):
        images, npz_labels = load_samples_npz(samples)
        labels = npz_labels if labels is None else labels
    else:
        images = np.asarray(samples)
    reference = load_reference_batch(reference_path)
    if "extractor" in reference and reference["extractor"] != features:
        raise ValueError(
            f"{reference_path} holds {reference['extractor']!r} statistics but features={features!r}: "
            f"evaluate with features={reference['extractor']!r} or rebuild the reference batch"
        )
    extractor = load_extractor(features, weights_path, device)
    sample_feats = extract_features(images, extractor, batch_size=batch_size)
    ref_stats, ref_pool = _reference_stats(reference, extractor, batch_size, device)
    if ref_stats["mu"].shape[-1] != sample_feats["pool"].shape[1]:
        raise ValueError(
            f"reference statistics are {ref_stats['mu'].shape[-1]}-d but the {features!r} extractor gives "
            f"{sample_feats['pool'].shape[1]}-d features: use the reference batch made for this extractor"
        )

    mu, sigma = feature_statistics(sample_feats["pool"])
    mu_s, sigma_s = feature_statistics(sample_feats["spatial"])
    precision = recall = None
    if ref_pool is not None:
        precision, recall = precision_recall(ref_pool, sample_feats["pool"], k=k, device=extractor.device)

    n = len(images)
    size = sample_count_label(n)
    result = {
        "fid": frechet_distance(mu, sigma, ref_stats["mu"], ref_stats["sigma"]),
        "sfid": frechet_distance(mu_s, sigma_s, ref_stats["mu_s"], ref_stats["sigma_s"]) if "mu_s" in ref_stats else None,
        "inception_score": inception_score(sample_feats["probs"]),
        "precision": precision,
        "recall": recall,
        "num_samples": n,
        "num_reference": int(len(reference["arr_0"])) if "arr_0" in reference else None,
        "fid_label": f"FID-{size}",
        "sfid_label": f"sFID-{size}",
        "inception_score_label": f"IS-{size}",
        "proxy": n < FULL_EVAL_SIZE,
        "precision_recall_k": k,
        "features": features,
        "reference": os.path.abspath(reference_path),
        "reference_sha256": sha256_file(reference_path),
        "reference_stats_from": "npz" if "mu" in reference else "arr_0",
        "extractor": extractor.identity,
    }
    if labels is not None and extractor.label_classifier:
        result["class_consistency"] = class_consistency(sample_feats["probs"], labels)
    return result


def evaluate_run(samples: str | os.PathLike, reference_path: str | os.PathLike, features: str = "inception",
                 weights_path: str | os.PathLike | None = None, fidelity_to: str | os.PathLike | None = None,
                 batch_size: int = 64, device: str | None = None) -> dict:
    """:func:`evaluate_quality` of a sample npz, plus its fidelity to the uncached run's images.

    ``fidelity_to``: the npz of the uncached run with the same seed and sample count; adds
    ``psnr_to_full``, ``ssim_to_full`` and that file's sha256.
    """
    from tokencache.metrics.fidelity import psnr, ssim

    result = evaluate_quality(samples, reference_path, features=features, weights_path=weights_path,
                              batch_size=batch_size, device=device)
    if fidelity_to:
        images, _ = load_samples_npz(samples)
        reference, _ = load_samples_npz(fidelity_to)
        if images.shape != reference.shape:
            raise ValueError(f"fidelity reference {fidelity_to} holds {reference.shape} images, the samples "
                             f"{images.shape}: compare runs of the same seed and sample count")
        result.update({"psnr_to_full": float(psnr(images, reference)), "ssim_to_full": float(ssim(images, reference)),
                       "fidelity_reference_sha256": sha256_file(fidelity_to)})
    return result
