"""Sample and reference batches in the ADM evaluator's npz format.

Samples: ``arr_0`` uint8 (N, H, W, 3) images, ``arr_1`` int64 (N,) class labels, as written by
guided-diffusion's and DiT's sampling scripts. Reference batches (e.g. ADM's
``VIRTUAL_imagenet256_labeled.npz``): ``mu``/``sigma`` (pool features) and ``mu_s``/``sigma_s``
(spatial features) statistics plus the images in ``arr_0`` for precision/recall. Batches written
here also store ``extractor`` (the feature extractor name) so statistics from one extractor are
never compared with features of another.

Writes go through :func:`tokencache.io.write_atomic` (a temporary file in the same folder, then
``os.replace``; the umask's mode; fixed zip time stamps, so equal arrays give equal bytes): an
interrupted run never leaves a truncated npz that a later evaluation would read. Reads say in
one line what is wrong with a file that is not what it should be (:func:`open_npz`).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tokencache.io import sha256_file, write_atomic  # noqa: F401  (sha256_file: imported from here too)

REFERENCE_KEYS = ("mu", "sigma", "mu_s", "sigma_s", "arr_0", "extractor")

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")


def _atomic_savez(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    write_atomic(path, arrays, format="npz")


def open_npz(path: str | os.PathLike, what: str = "npz"):
    """``np.load`` of an npz file, or one line saying what the file is instead and how to fix it.

    Missing, empty, ``.npy``, truncated, non-zip and pickled files all end in a ValueError (or
    FileNotFoundError) naming the file; ``allow_pickle`` stays off.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder, not an npz file")
    with open(path, "rb") as f:
        head = f.read(6)
    if not head:
        raise ValueError(f"{what} {path} is empty (0 bytes): it was not written completely; make it again")
    if head.startswith(NPY_MAGIC):
        raise ValueError(f"{what} {path} is a single .npy array, not an npz: save with "
                         f"np.savez(path, arr_0=images, arr_1=labels)")
    if not head.startswith(ZIP_MAGICS):
        raise ValueError(f"{what} {path} is not an npz file (no zip header): make it with np.savez or tokencache")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:  # zipfile, numpy and OS errors of a damaged archive
        raise ValueError(f"{what} {path} cannot be read ({_reason(exc)}): it is truncated or damaged; make it again") from None
    return data


def _reason(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    if "allow_pickle" in text or "pickle" in text:
        return "it holds pickled Python objects, not plain arrays"
    return (text[:120] + "…" if len(text) > 120 else text) or type(exc).__name__


def _read(data, key: str, path, what: str) -> np.ndarray:
    try:
        return data[key]
    except Exception as exc:  # a damaged member shows up only when read
        raise ValueError(f"{what} {path}: array {key} cannot be read ({_reason(exc)}): the file is truncated or "
                         f"damaged; make it again") from None


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
    """Read ``(images, labels)`` from a samples npz; labels are None when ``arr_1`` is absent.

    Anything else than an ADM sample batch (see :func:`open_npz`, no ``arr_0``, no images, labels
    that do not match the images) is one ValueError line naming the file.
    """
    with open_npz(path, "samples") as data:
        if "arr_0" not in data.files:
            raise ValueError(f"samples {path} has no arr_0 images (arrays: {', '.join(data.files) or 'none'}): "
                             f"not an ADM sample batch")
        try:
            images = _check_images(_read(data, "arr_0", path, "samples"))
        except ValueError as exc:
            raise ValueError(f"samples {path}: {exc}") from None
        labels = _read(data, "arr_1", path, "samples") if "arr_1" in data.files else None
    if len(images) == 0:
        raise ValueError(f"samples {path} holds no images")
    if labels is not None and labels.shape != (len(images),):
        raise ValueError(f"samples {path}: arr_1 holds {labels.shape} labels for {len(images)} images")
    return images, labels


def load_reference_batch(path: str | os.PathLike) -> dict[str, np.ndarray | str]:
    """Read a reference batch: whichever of mu, sigma, mu_s, sigma_s, arr_0, extractor it holds."""
    with open_npz(path, "reference batch") as data:
        ref = {key: _read(data, key, path, "reference batch") for key in REFERENCE_KEYS if key in data.files}
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
    from tokencache.metrics.features import extract_features
    from tokencache.metrics.fid import feature_statistics

    images = _check_images(images_uint8)
    feats = extract_features(images, extractor, batch_size=batch_size, weights_path=weights_path, device=device,
                             progress=progress)
    mu, sigma = feature_statistics(feats["pool"])
    mu_s, sigma_s = feature_statistics(feats["spatial"])
    stats = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
    name = extractor if isinstance(extractor, str) else extractor.name
    _atomic_savez(path, {**stats, "arr_0": images, "extractor": np.array(name)})
    return stats
