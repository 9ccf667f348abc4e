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
FEATURES_FORMAT = "tokencache-reference-features/1"


class ReferenceFeaturesMismatch(ValueError):
    """A reference-features file made from another reference batch or another extractor's weights."""


def save_reference_features(path: str | os.PathLike, reference_path: str | os.PathLike, extractor,
                            batch_size: int = 64, progress: bool = False) -> dict:
    """Extract the reference images' (``arr_0``) pool and spatial features once, for every evaluation.

    Each evaluation needs them for precision/recall and KID (and for the statistics when the
    batch holds none); ADM's batch has 10,000 images, so extracting them once instead of once per
    run saves that many Inception forwards per evaluated run. The file records the reference
    batch's sha256 and the extractor's weights, and :func:`load_reference_features` refuses it
    for any other pair. ``extractor``: a loaded :class:`~tokencache.metrics.features.FeatureExtractor`.
    """
    from tokencache.io import sha256_file

    reference = load_reference_batch(reference_path)
    if "arr_0" not in reference:
        raise ValueError(f"{reference_path} holds no images (arr_0): there are no reference features to extract")
    feats = extract_features(reference["arr_0"], extractor, batch_size=batch_size, progress=progress)
    record = {"format": np.array(FEATURES_FORMAT), "pool": feats["pool"], "spatial": feats["spatial"],
              "reference_sha256": np.array(sha256_file(reference_path)),
              "extractor": np.array(extractor.name),
              "weights_sha256": np.array(str(extractor.identity.get("weights_sha256")))}
    write_atomic(path, record, format="npz")
    return {"images": int(len(reference["arr_0"])), "pool_dim": int(feats["pool"].shape[1])}


def load_reference_features(path: str | os.PathLike, reference_path: str | os.PathLike, extractor) -> dict:
    """The ``pool`` and ``spatial`` features of :func:`save_reference_features`, checked against the pair."""
    from tokencache.io import sha256_file

    with open_npz(path, "reference features") as data:
        values = {key: read_array(data, key, path, "reference features") for key in
                  ("format", "pool", "spatial", "reference_sha256", "extractor", "weights_sha256")}
    if str(values["format"]) != FEATURES_FORMAT:
        raise ReferenceFeaturesMismatch(f"{path} is not a reference-features file ({FEATURES_FORMAT}): make one with "
                                        "`tokencache reference-features`")
    want = {"reference_sha256": sha256_file(reference_path), "extractor": extractor.name,
            "weights_sha256": str(extractor.identity.get("weights_sha256"))}
    for key, expected in want.items():
        if str(values[key]) != expected:
            raise ReferenceFeaturesMismatch(
                f"{path} was made for another {key.replace('_', ' ')} ({str(values[key])[:16]}…, here "
                f"{expected[:16]}…): remake it with `tokencache reference-features {reference_path} …`")
    return {"pool": values["pool"], "spatial": values["spatial"]}


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
