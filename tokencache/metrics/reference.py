"""Reference batches in the ADM evaluator's npz format: statistics of real images to compare with.

A reference batch (e.g. ADM's ``VIRTUAL_imagenet256_labeled.npz``) holds ``mu``/``sigma`` (pool
features) and ``mu_s``/``sigma_s`` (spatial features) statistics plus the images in ``arr_0``
for precision/recall. Batches written here also store ``extractor`` (the feature extractor
name), so statistics from one extractor are never compared with features of another.

Making one needs the feature extractors and the statistics of the metrics, so it lives here and
not in :mod:`tokencache.data.npz` (data sits below metrics); the file handling is that module's
(one-line errors for damaged files, atomic writes with fixed zip time stamps).
"""
from __future__ import annotations

import os

import numpy as np

from tokencache.data.npz import check_images, open_npz, read_array
from tokencache.io import write_atomic
from tokencache.metrics.features import extract_features
from tokencache.metrics.fid import feature_statistics

REFERENCE_KEYS = ("mu", "sigma", "mu_s", "sigma_s", "arr_0", "extractor")


def load_reference_batch(path: str | os.PathLike) -> dict[str, np.ndarray | str]:
    """Read a reference batch: whichever of mu, sigma, mu_s, sigma_s, arr_0, extractor it holds."""
    with open_npz(path, "reference batch") as data:
        ref = {key: read_array(data, key, path, "reference batch") for key in REFERENCE_KEYS if key in data.files}
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
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Write a reference batch like ADM's: pool and spatial statistics of the images, and the images.

    Returns the statistics written (``mu``, ``sigma``, ``mu_s``, ``sigma_s``).
    """
    images = check_images(images_uint8)
    feats = extract_features(images, extractor, batch_size=batch_size, weights_path=weights_path, device=device,
                             progress=progress)
    mu, sigma = feature_statistics(feats["pool"])
    mu_s, sigma_s = feature_statistics(feats["spatial"])
    stats = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
    name = extractor if isinstance(extractor, str) else extractor.name
    write_atomic(path, {**stats, "arr_0": images, "extractor": np.array(name)}, format="npz")
    return stats
