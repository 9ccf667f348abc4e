"""Writing files safely, and their checksums: the package's one way to do each.

:func:`write_atomic` writes text, bytes, JSON, an npz of arrays, a ``torch.save`` object or
whatever a callable writes, always through a temporary file in the target's folder that is
renamed over the target (``os.replace``) only once it is complete and flushed to disk. A killed
or failing write (full disk, read-only folder, exception in the writer) never leaves a
half-written target, nor the temporary file. The file is created with mode ``0o666`` filtered
by the process umask, like ``open(path, "w")`` (``tempfile.mkstemp`` would give 0600, which
colleagues on a shared cluster cannot read).

npz files are written with a fixed time stamp in their zip entries (``np.savez`` stamps the
current time), so the same arrays always give the same bytes and the same sha256.

:func:`sha256_file` is the hex sha256 of a file, read in chunks.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import zipfile
from pathlib import Path
from typing import Any, Callable, Union

PathLike = Union[str, os.PathLike]

#: the zip time stamp of every npz entry (zip cannot store dates before 1980)
NPZ_DATE_TIME = (1980, 1, 1, 0, 0, 0)

FORMATS = ("text", "bytes", "json", "npz", "torch")


def _infer_format(path: Path, data: Any) -> str:
    if isinstance(data, str):
        return "text"
    if isinstance(data, (bytes, bytearray, memoryview)):
        return "bytes"
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return "npz"
    if suffix in (".pt", ".pth", ".ckpt"):
        return "torch"
    if suffix == ".json" or isinstance(data, (dict, list)):
        return "json"
    raise ValueError(f"write_atomic: give format= for {type(data).__name__} data and {path.name}")


def _write_npz(f, arrays: dict) -> None:
    """``np.savez`` (uncompressed, ``allow_pickle=False``) with fixed zip time stamps."""
    import numpy as np

    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, value in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=NPZ_DATE_TIME)
            info.external_attr = 0o644 << 16
            with archive.open(info, "w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, np.asanyarray(value), allow_pickle=False)


def _writer(fmt: Union[str, Callable], data: Any) -> Callable:
    if callable(fmt):
        return fmt
    if fmt == "text":
        return lambda f: f.write(data.encode("utf-8"))
    if fmt == "bytes":
        return lambda f: f.write(bytes(data))
    if fmt == "json":
        return lambda f: f.write((json.dumps(data, indent=2, allow_nan=True) + "\n").encode("utf-8"))
    if fmt == "npz":
        return lambda f: _write_npz(f, data)
    if fmt == "torch":
        import torch

        return lambda f: torch.save(data, f)
    raise ValueError(f"write_atomic: unknown format {fmt!r}; use one of {', '.join(FORMATS)} or a callable")


def write_atomic(path: PathLike, data: Any = None, format: Union[str, Callable, None] = None) -> Path:
    """Write ``data`` to ``path`` atomically; return the path.

    ``format``: ``"text"`` (str), ``"bytes"``, ``"json"`` (any JSON-serialisable object),
    ``"npz"`` (a dict of arrays), ``"torch"`` (anything ``torch.save`` takes), or a callable
    ``writer(binary_file)`` that writes the content itself (``data`` is then ignored). Without
    it, the format follows the data (str, bytes) or the suffix (.npz, .pt/.pth/.ckpt, .json).
    Missing parent folders are created. The final file's mode is ``0o666 & ~umask``.
    """
    path = Path(path)
    write = _writer(format if format is not None else _infer_format(path, data), data)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{path.name}.{secrets.token_hex(4)}.part"
    # O_EXCL on a fresh random name; mode 0o666 lets the kernel apply the umask (and default ACLs)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
            raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc  # name the file
        raise
    return path


def sha256_file(path: PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (reference batches and checkpoints are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()

