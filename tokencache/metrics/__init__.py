"""Metrics: sample quality (ADM evaluator definitions) and one-to-one fidelity to the full model.

Importing this package does not load torch-fidelity; it is imported when features are extracted.
"""
from tokencache.metrics.features import extract_features
from tokencache.metrics.fid import (
    feature_statistics,
    frechet_distance,
    frechet_distance_of_features,
    inception_score,
    precision_recall,
)
from tokencache.metrics.fidelity import psnr, ssim
from tokencache.metrics.quality import evaluate_quality
# cost: fvcore and pandas are imported only when counting / writing tables
from tokencache.metrics.flops import analytic_forward_macs, forward_macs, run_macs, sampling_macs
from tokencache.metrics.latency import measure_latency, write_latency_table

__all__ = [
    "evaluate_quality",
    "extract_features",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_of_features",
    "inception_score",
    "precision_recall",
    "psnr",
    "ssim",
    "analytic_forward_macs",
    "forward_macs",
    "run_macs",
    "sampling_macs",
    "measure_latency",
    "write_latency_table",
]
