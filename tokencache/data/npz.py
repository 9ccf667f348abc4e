"""Sample batches in the ADM evaluator's npz format, and reading npz files safely.

Samples: ``arr_0`` uint8 (N, H, W, 3) images, ``arr_1`` int64 (N,) class labels, as written by
guided-diffusion's and DiT's sampling scripts. Reference batches (feature statistics of real
images) are made and read by :mod:`tokencache.metrics.reference`, which computes the statistics
with the metrics' feature extractors; it reads them through :func:`open_npz` and
:func:`read_array` here.

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


def read_array(data, key: str, path, what: str) -> np.ndarray:
    """Array ``key`` of an open npz; a damaged member is one ValueError line naming the file."""
    try:
        return data[key]
    except Exception as exc:  # a damaged member shows up only when read
        raise ValueError(f"{what} {path}: array {key} cannot be read ({_reason(exc)}): the file is truncated or "
                         f"damaged; make it again") from None


def check_images(images: np.ndarray) -> np.ndarray:
    """``images`` as an array, if they are uint8 (N, H, W, C) with C in (1, 3); else a ValueError."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected uint8 images (N, H, W, C) with C in (1, 3), got {images.dtype} {images.shape}")
    return images


def save_samples_npz(path: str | os.PathLike, images_uint8: np.ndarray, labels: np.ndarray | None = None) -> None:
    """Write samples as ADM does: ``arr_0`` images (N, H, W, C) uint8, ``arr_1`` labels if given."""
    images = check_images(images_uint8)
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
            images = check_images(read_array(data, "arr_0", path, "samples"))
        except ValueError as exc:
            raise ValueError(f"samples {path}: {exc}") from None
        labels = read_array(data, "arr_1", path, "samples") if "arr_1" in data.files else None
    if len(images) == 0:
        raise ValueError(f"samples {path} holds no images")
    if labels is not None and labels.shape != (len(images),):
        raise ValueError(f"samples {path}: arr_1 holds {labels.shape} labels for {len(images)} images")
    return images, labels
