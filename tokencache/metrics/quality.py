"""Sample quality against a reference batch: FID, sFID, IS, precision, recall (ADM evaluator), KID.

``evaluate_quality`` reads a sample batch and a reference batch (ADM npz format), extracts
features with one extractor (``"inception"`` for ImageNet, ``"digits"`` for the testbed) and
returns a JSON-serialisable record. Reference statistics are taken from
the npz when present (as ADM does), the reference file's sha256 and the extractor's weights are
recorded, and a result on fewer than 50,000 samples is labelled with its size (``FID-5K`` is a
proxy, not comparable with FID-50K). KID is clean-fid's, on the same pool features.
:func:`evaluate_run` adds fidelity to the ``full`` run, bootstrap intervals of every metric
(:mod:`tokencache.metrics.bootstrap`) and the provenance of the evaluation.
"""
from __future__ import annotations

import os

import numpy as np

from tokencache.data.npz import load_samples_npz
from tokencache.io import sha256_file
from tokencache.metrics.fid import feature_statistics, frechet_distance_of_features, inception_score, precision_recall
from tokencache.metrics.reference import load_reference_batch

FULL_EVAL_SIZE = 50_000


def sample_count_label(n: int) -> str:
    """``50000 → "50K"``, ``5000 → "5K"``, ``450 → "450"``."""
    return f"{n // 1000}K" if n >= 1000 and n % 1000 == 0 else str(n)


def _reference_stats(reference: dict, extractor, batch_size: int, device,
                     progress: bool = False, features: dict | None = None) -> tuple[dict, np.ndarray | None]:
    """Reference statistics (from the npz, else from its images) and its pool features if it has images.

    ``features``: the images' features extracted once (:func:`~tokencache.metrics.reference.load_reference_features`).
    """
    from tokencache.metrics.features import extract_features

    pool = None
    stats = {key: reference[key] for key in ("mu", "sigma", "mu_s", "sigma_s") if key in reference}
    if "arr_0" in reference:
        feats = features if features is not None else extract_features(
            reference["arr_0"], extractor, batch_size=batch_size, device=device, progress=progress)
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
    progress: bool = False,
) -> dict:
    """FID, sFID, IS, precision, recall and KID of ``samples`` against the reference batch.

    ``samples`` is a sample npz path or a uint8 (N, H, W, C) array. ``labels`` (default: the
    npz's ``arr_1``) add class consistency when the extractor's classifier predicts those labels
    (the digits evaluator); labels outside its classes are an error. Precision/recall and KID need
    the reference images (``arr_0``); they are None for a statistics-only reference, as is sFID
    for a reference without ``mu_s``.
    """
    return _quality(samples, reference_path, features, weights_path, labels, batch_size, device, k, progress)[0]


def _quality(samples, reference_path, features, weights_path, labels, batch_size, device, k, progress,
             reference_features=None):
    """:func:`evaluate_quality`'s result and what the bootstrap needs (features, reference)."""
    from tokencache.checks import check_labels
    from tokencache.metrics.bootstrap import KID_MAX_SUBSET, KID_SEED, KID_SUBSETS, kid
    from tokencache.metrics.digits_evaluator import class_consistency
    from tokencache.metrics.features import extract_features, load_extractor

    source = str(samples) if isinstance(samples, (str, os.PathLike)) else "samples"
    if isinstance(samples, (str, os.PathLike)):
        images, npz_labels = load_samples_npz(samples)
        labels = npz_labels if labels is None else labels
    else:
        images = np.asarray(samples)
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    reference = load_reference_batch(reference_path)
    if "extractor" in reference and reference["extractor"] != features:
        raise ValueError(
            f"{reference_path} holds {reference['extractor']!r} statistics but features={features!r}: "
            f"evaluate with features={reference['extractor']!r} or rebuild the reference batch"
        )
    extractor = load_extractor(features, weights_path, device)
    if labels is not None and extractor.label_classifier:
        check_labels(labels, extractor.num_classes, source)
    sample_feats = extract_features(images, extractor, batch_size=batch_size, progress=progress)
    cached = None
    if reference_features is not None:
        from tokencache.metrics.reference import load_reference_features

        cached = load_reference_features(reference_features, reference_path, extractor)
    ref_stats, ref_pool = _reference_stats(reference, extractor, batch_size, device, progress, cached)
    if ref_stats["mu"].shape[-1] != sample_feats["pool"].shape[1]:
        raise ValueError(
            f"reference statistics are {ref_stats['mu'].shape[-1]}-d but the {features!r} extractor gives "
            f"{sample_feats['pool'].shape[1]}-d features: use the reference batch made for this extractor"
        )
    n = len(images)
    if n < 2:
        raise ValueError(f"{source} holds {n} image: FID and the other distribution metrics need at least 2")

    fid, fid_root = frechet_distance_of_features(sample_feats["pool"], ref_stats["mu"], ref_stats["sigma"])
    sfid, sfid_root = (frechet_distance_of_features(sample_feats["spatial"], ref_stats["mu_s"], ref_stats["sigma_s"])
                       if "mu_s" in ref_stats else (None, None))
    precision = recall = kid_value = None
    if ref_pool is not None:
        precision, recall = precision_recall(ref_pool, sample_feats["pool"], k=k, device=extractor.device)
        kid_value = kid(sample_feats["pool"], ref_pool)

    size = sample_count_label(n)
    result = {
        "fid": fid,
        "sfid": sfid,
        "inception_score": inception_score(sample_feats["probs"]),
        "precision": precision,
        "recall": recall,
        "kid": kid_value,
        "num_samples": n,
        "num_reference": int(len(reference["arr_0"])) if "arr_0" in reference else None,
        "fid_label": f"FID-{size}",
        "sfid_label": f"sFID-{size}",
        "inception_score_label": f"IS-{size}",
        "proxy": n < FULL_EVAL_SIZE,
        "precision_recall_k": k,
        "kid_settings": None if kid_value is None else {
            "implementation": "clean-fid kernel_distance (cubic polynomial kernel, unbiased MMD²)",
            "features": "pool", "subsets": KID_SUBSETS, "subset_size": min(n, len(ref_pool), KID_MAX_SUBSET),
            "seed": KID_SEED},
        "features": features,
        "reference": os.path.abspath(reference_path),
        "reference_sha256": sha256_file(reference_path),
        "reference_stats_from": "npz" if "mu" in reference else "arr_0",
        "extractor": extractor.identity,
    }
    if "gram" in (fid_root, sfid_root):  # fewer samples than feature dimensions: see frechet_distance_of_features
        result["frechet_trace_root"] = {"fid": fid_root, "sfid": sfid_root}
    correct = None
    if labels is not None and extractor.label_classifier:
        result["class_consistency"] = class_consistency(sample_feats["probs"], labels)
        correct = (sample_feats["probs"].argmax(axis=1) == np.asarray(labels).reshape(-1)).astype(np.float64)
    context = {"features": sample_feats, "ref_stats": ref_stats, "ref_pool": ref_pool, "correct": correct, "k": k,
               "images": images, "device": extractor.device}
    return result, context


#: metrics that get bootstrap intervals (when computed), in table order
BOOTSTRAP_METRICS = ("fid", "sfid", "inception_score", "precision", "recall", "kid", "class_consistency",
                     "psnr_to_full", "ssim_to_full")


def evaluate_run(samples: str | os.PathLike, reference_path: str | os.PathLike, features: str = "inception",
                 weights_path: str | os.PathLike | None = None, fidelity_to: str | os.PathLike | None = None,
                 batch_size: int = 64, device: str | None = None, progress: bool = False,
                 bootstrap: int = 0, bootstrap_seed: int = 0,
                 bootstrap_out: str | os.PathLike | None = None,
                 reference_features: str | os.PathLike | None = None) -> dict:
    """:func:`evaluate_quality` of a sample npz, plus its fidelity to the uncached run's images.

    ``fidelity_to``: the npz of the uncached run with the same seed and sample count; adds
    ``psnr_to_full`` (identical images capped, see :func:`~tokencache.metrics.fidelity.psnr_cap`),
    ``ssim_to_full``, ``identical_to_full`` and that file's sha256.

    ``bootstrap``: resamples of the samples (0: none) for 95% percentile intervals of every
    metric (``ci95``); the resampled values go to ``bootstrap_out`` (npz) when given, where
    :func:`tokencache.metrics.bootstrap.paired_interval` pairs them with another run's
    (same size and seed: same index sets). ``reference_features``: the reference images' features
    extracted once (``tokencache reference-features``), used instead of extracting them here. The
    result also records its provenance.
    """
    from tokencache.metrics.fidelity import identical, psnr, psnr_cap, ssim
    from tokencache.provenance import provenance

    result, context = _quality(samples, reference_path, features, weights_path, None, batch_size, device, 3, progress,
                               reference_features)
    per_image = {}
    if fidelity_to:
        images = context["images"]
        reference, _ = load_samples_npz(fidelity_to)
        if images.shape != reference.shape:
            raise ValueError(f"fidelity reference {fidelity_to} holds {reference.shape} images, the samples "
                             f"{images.shape}: compare runs of the same seed and sample count")
        per_image = {"psnr_to_full": psnr(images, reference, per_image=True),
                     "ssim_to_full": ssim(images, reference, per_image=True)}
        result.update({"psnr_to_full": float(per_image["psnr_to_full"].mean()),
                       "ssim_to_full": float(per_image["ssim_to_full"].mean()),
                       "identical_to_full": identical(images, reference),
                       "psnr_cap_db": psnr_cap(int(np.prod(images.shape[1:]))),
                       "fidelity_reference_sha256": sha256_file(fidelity_to)})
    if bootstrap:
        values, info = bootstrap_metrics(context, per_image, bootstrap, bootstrap_seed)
        from tokencache.metrics.bootstrap import interval, percentile_interval, resampling_bias

        result["ci95"] = {name: interval(v, result.get(name)) for name, v in values.items()}
        info["resampling_bias"] = {name: resampling_bias(v, result.get(name)) for name, v in values.items()}
        info["ci95_not_recentred"] = {name: percentile_interval(v) for name, v in values.items()}
        result["bootstrap"] = info
        if bootstrap_out is not None:
            from tokencache.io import write_atomic

            arrays = {f"values_{name}": v for name, v in values.items()}
            arrays.update(seed=np.int64(bootstrap_seed), resamples=np.int64(bootstrap),
                          num_samples=np.int64(result["num_samples"]), indices_sha256=np.array(info["indices_sha256"]))
            write_atomic(bootstrap_out, arrays, format="npz")
            info["values_file"] = os.path.basename(os.fspath(bootstrap_out))
    result["provenance"] = provenance(str(context["device"]))
    return result


def bootstrap_metrics(context: dict, per_image: dict, resamples: int, seed: int) -> tuple[dict, dict]:
    """Each metric's values over ``resamples`` bootstrap resamples of the samples, and the settings."""
    import time

    from tokencache.metrics.bootstrap import (
        MAX_PAIRWISE,
        frechet_values,
        inception_score_values,
        index_counts,
        indices_digest,
        kid_values,
        precision_recall_values,
        resample_indices,
        weighted_mean,
    )

    start = time.perf_counter()
    feats, stats = context["features"], context["ref_stats"]
    n = len(feats["pool"])
    indices = resample_indices(n, resamples, seed)
    counts = index_counts(indices, n)
    device = context["device"]
    values = {"fid": frechet_values(feats["pool"], counts, stats["mu"], stats["sigma"], device=device)}
    if "mu_s" in stats:
        values["sfid"] = frechet_values(feats["spatial"], counts, stats["mu_s"], stats["sigma_s"], device=device)
    values["inception_score"] = inception_score_values(feats["probs"], indices, counts)
    if context["ref_pool"] is not None:
        values["precision"], recall = precision_recall_values(context["ref_pool"], feats["pool"], counts, k=context["k"])
        if recall is not None:
            values["recall"] = recall
        kids = kid_values(feats["pool"], context["ref_pool"], counts)
        if kids is not None:
            values["kid"] = kids
    if context["correct"] is not None:
        values["class_consistency"] = weighted_mean(context["correct"], counts)
    for name, per in per_image.items():
        values[name] = weighted_mean(per, counts)
    info = {"resamples": int(resamples), "seed": int(seed), "confidence": 0.95,
            "interval": "percentile, re-centred on the estimate (tokencache.metrics.bootstrap.interval)",
            "unit": "samples, drawn with replacement; reference fixed", "indices_sha256": indices_digest(indices),
            "not_resampled": [m for m in ("recall", "kid") if m not in values and context["ref_pool"] is not None
                              and n > MAX_PAIRWISE],
            "seconds": round(time.perf_counter() - start, 2)}
    return values, info
