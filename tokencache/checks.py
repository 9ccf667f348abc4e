"""Checks that turn mistakes into one line, before any long work.

Each check raises ``ValueError`` (or ``FileNotFoundError``) with one line that names the input
and the fix; the command line prints it as ``tokencache: error: …`` and exits 2, and the
workflow's config checks print it as ``config: …`` when the DAG is built.

* :func:`check_output_file` — an output path that can be written: not a folder, its folder
  writable (created if missing), and, given the bytes it will take, enough free disk;
* :func:`check_number` — a command-line number in its range (``--seed -1``, ``--cfg-scale inf``);
* :func:`check_labels` — class labels of a sample file inside a classifier's classes.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, os.PathLike]

#: free disk kept beyond an estimate (file system metadata, logs, the JSON beside the npz)
DISK_MARGIN_BYTES = 16 << 20


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _existing_ancestor(folder: Path) -> Path:
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def probe_write(folder: Path) -> None:
    """Create and delete a file in ``folder`` (what a write will do); OSError if that fails."""
    with tempfile.TemporaryFile(dir=folder, prefix=".tokencache-write-probe."):
        pass


def check_output_file(path: PathLike, needed_bytes: int = 0, what: str = "--out") -> Path:
    """Fail now, in one line, if ``path`` cannot be written (or would not fit on its disk).

    The folder is created if missing (as the write would). ``needed_bytes`` is the estimated
    size of what will be written; with it, the check also needs that much free disk plus a
    margin. Returns ``path``.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder: give a file path inside it, e.g. {path / ('out' + (path.suffix or '.npz'))}")
    folder = path.parent if str(path.parent) else Path(".")
    existing = _existing_ancestor(folder)
    if not existing.is_dir():
        raise ValueError(f"{what} {path}: {existing} is a file, not a folder; choose another {what}")
    try:
        if existing != folder.absolute():
            folder.mkdir(parents=True, exist_ok=True)
        probe_write(folder)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ValueError(f"{what} {path}: cannot write in {folder.absolute()} ({reason}); choose another {what} "
                         f"or make the folder writable") from None
    if needed_bytes:
        free = shutil.disk_usage(folder).free
        if free < needed_bytes + DISK_MARGIN_BYTES:
            raise ValueError(f"{what} {path}: needs about {human_bytes(needed_bytes)} but only {human_bytes(free)} "
                             f"are free on that disk; free some space, choose another {what} or ask for fewer samples")
    return path


def sample_file_bytes(num_samples: int, image_size: int, channels: int = 3) -> int:
    """Size of a samples npz (uint8 NHWC images, int64 labels) plus a little for the zip and the JSON."""
    return int(num_samples) * (int(image_size) ** 2 * int(channels) + 8) + (64 << 10)


def check_number(name: str, value, minimum: Optional[float] = None, maximum: Optional[float] = None,
                 integer: bool = False, exclusive_minimum: bool = False) -> None:
    """``--name`` must be a finite number within [minimum, maximum] (one ValueError line otherwise)."""
    flag = f"--{name.replace('_', '-')}"
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if v is None:
            continue
        if integer and (isinstance(v, bool) or int(v) != v):
            raise ValueError(f"{flag} must be a whole number, got {v}")
        if not math.isfinite(v):
            raise ValueError(f"{flag} must be a finite number, got {v}")
        if minimum is not None and (v <= minimum if exclusive_minimum else v < minimum):
            raise ValueError(f"{flag} must be {'>' if exclusive_minimum else '≥'} {minimum:g}, got {v}")
        if maximum is not None and v > maximum:
            raise ValueError(f"{flag} must be ≤ {maximum:g}, got {v}")


def check_labels(labels, num_classes: int, source: str) -> None:
    """Labels must be whole numbers in 0 … num_classes − 1 (one ValueError line otherwise)."""
    import numpy as np

    labels = np.asarray(labels)
    if labels.size == 0:
        return
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{source}: labels (arr_1) are {labels.dtype}, not integers: write class indices")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ValueError(f"{source}: label {bad} in arr_1 is outside the evaluator's {num_classes} classes "
                         f"(0–{num_classes - 1}); these samples were not drawn for this evaluator")
