"""A workflow's results folder: which of its files are deterministic, which volatile, and the split.

A faithful rerun of the workflow (same config, same inputs, same software) must rewrite every
*deterministic* file of ``results/<name>/`` with the same bytes, on any machine and in any folder,
so that ``git status`` after the rerun shows only the *volatile* files: those that hold what
varies with the machine and the moment. :data:`VOLATILE` lists them, in one place (the tests and
``tokencache compare`` read it):

* ``*.provenance.json`` — beside each ``run.json`` and ``metrics.json``: the machine (CPU, ISA,
  OS, CPUs and threads), the software (Python, torch, numpy, tokencache and its git commit), the
  load average, the wall-clock seconds of sampling and of the bootstrap, and the absolute paths
  of the files the job was given;
* ``tables/latency.{csv,md}`` and ``plots/pareto_latency.png`` — the sampling jobs' measured
  seconds per image and the speed-ups computed from them;
* ``logs/`` — the jobs' console output (timings, warnings, file names as the command line gave
  them) and ``stage_times.txt``;
* ``report.html`` — Snakemake's report, which carries dates and job run times.

A job's record (the JSON ``tokencache sample``/``merge``/``evaluate`` print) is written into the
results folder by :func:`write_split`: the deterministic part as the record itself with the keys
of :data:`MOVED` taken out and the file paths of :data:`PATH_FIELDS` made portable
(:func:`portable_path`: ``shipped:NAME`` for a file that ships with tokencache, else relative to
the results folder), and the rest — with the original paths — in ``<name>.provenance.json``
beside it. :func:`join_record` puts both back together: nothing of the record is lost.
"""
from __future__ import annotations

import copy
import fnmatch
import json
import os
from pathlib import Path, PurePosixPath
from typing import Iterable, Optional, Union

PathLike = Union[str, os.PathLike]

#: volatile files of a results folder: fnmatch patterns over paths relative to it (``*`` also
#: matches ``/``); every other file the workflow writes is deterministic
VOLATILE = (
    "*.provenance.json",         # machine, software, commit, load, seconds and absolute paths of a job
    "tables/latency.csv",        # measured sampling seconds per image and the speed-ups from them
    "tables/latency.md",
    "plots/pareto_latency.png",  # speed-up in measured latency against FID
    "logs/*",                    # the jobs' console output and stage_times.txt
    "report.html",               # Snakemake's report: dates and job run times
)

#: keys of a job's record that vary with the machine or the moment (nested keys as tuples)
MOVED = (("seconds",), ("torch",), ("provenance",), ("data_parallel",), ("bootstrap", "seconds"))

#: keys of a job's record that hold file paths (``cache.params.*`` and the like: the calibration file
#: parameter the record names in ``cache.calibration_param``)
PATH_FIELDS = (("request", "checkpoint"), ("request", "vae"), ("reference",), ("extractor", "weights"))

#: where a record names the calibration parameter whose value is a file path
CALIBRATION_PARAM = ("cache", "calibration_param")
CALIBRATION_PATHS = (("request", "method_params"), ("cache", "params"), ("cache", "resolved"))

#: suffix of the volatile companion of ``<name>.json``
PROVENANCE_SUFFIX = ".provenance.json"


def is_volatile(relative_path: Union[str, PurePosixPath]) -> bool:
    """Whether a file of a results folder (path relative to the folder) is volatile (:data:`VOLATILE`)."""
    text = PurePosixPath(relative_path).as_posix()
    return any(fnmatch.fnmatchcase(text, pattern) for pattern in VOLATILE)


def result_files(root: PathLike) -> list[str]:
    """Every file under a results folder, as sorted posix paths relative to it (temporary files aside)."""
    root = Path(root)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".part"))


def deterministic_files(root: PathLike) -> list[str]:
    """The files of a results folder that a faithful rerun must rewrite byte for byte."""
    return [f for f in result_files(root) if not is_volatile(f)]


def provenance_path(path: PathLike) -> Path:
    """The volatile companion of a record: ``run.json`` → ``run.provenance.json``."""
    path = Path(path)
    return path.with_name(path.stem + PROVENANCE_SUFFIX)


# ---------------------------------------------------------------------------------- paths


def portable_path(value, root: PathLike, cwd: Optional[PathLike] = None):
    """A file path as it reads the same on any machine and in any checkout folder.

    A file that ships with tokencache is ``shipped:NAME``; a file inside the results folder
    ``root`` is relative to it (``calibration/DiT-digits/ddim20/l2c.pt``); a file elsewhere in the
    working folder ``cwd`` (the repository) is relative to ``root`` too (``../../checkpoints/x.pt``);
    any other file is its name alone (its sha256 is in the record). A value that is no path (``ema``:
    no folder in it and no such file; ``shipped:…``; None) is returned unchanged.
    """
    if not isinstance(value, str) or not value or value.startswith("shipped:"):
        return value
    path = Path(cwd or ".") / value if not os.path.isabs(value) else Path(value)
    if not path.exists() and "/" not in value and os.sep not in value:
        return value
    path = path.resolve()
    shipped = _shipped_files()
    if path in shipped:
        return f"shipped:{shipped[path]}"
    root = (Path(cwd or ".") / root).resolve()
    base = Path(cwd or ".").resolve()
    if path == root or root in path.parents or base == path or base in path.parents:
        return Path(os.path.relpath(path, root)).as_posix()
    return path.name


def resolve_portable(value, root: PathLike):
    """The file a portable path of results folder ``root`` names (:func:`portable_path`'s inverse for
    shipped files and paths relative to ``root``); absolute paths and non-strings are unchanged."""
    if not isinstance(value, str) or not value or os.path.isabs(value):
        return value
    if value.startswith("shipped:"):
        from tokencache.weights import resolve

        return resolve(value)
    return os.path.normpath(os.path.join(os.fspath(root), value))


def _shipped_files() -> dict:
    """Resolved path → name of every file that ships with tokencache (tokencache/weights/)."""
    from tokencache.weights import FOLDER, manifest

    return {(FOLDER / entry["file"]).resolve(): name for name, entry in manifest().items()}


# ---------------------------------------------------------------------------------- records


def _get(record: dict, keys: tuple):
    for key in keys:
        if not isinstance(record, dict) or key not in record:
            return None
        record = record[key]
    return record


def _pop(record: dict, keys: tuple, into: dict) -> None:
    """Move ``record[k1][k2]…`` to the same place in ``into`` (when present)."""
    parent = _get(record, keys[:-1]) if len(keys) > 1 else record
    if not isinstance(parent, dict) or keys[-1] not in parent:
        return
    target = into
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = parent.pop(keys[-1])


def _path_fields(record: dict) -> list[tuple]:
    """The keys of ``record`` that hold file paths (:data:`PATH_FIELDS` and the calibration file's)."""
    fields = [keys for keys in PATH_FIELDS if isinstance(_get(record, keys), str)]
    param = _get(record, CALIBRATION_PARAM)
    if param:
        fields += [(*where, param) for where in CALIBRATION_PATHS if isinstance(_get(record, (*where, param)), str)]
    return fields


def split_record(record: dict, root: PathLike, cwd: Optional[PathLike] = None) -> tuple[dict, dict]:
    """(deterministic part, volatile part) of a job's record written into results folder ``root``.

    The deterministic part is the record without the keys of :data:`MOVED`, its file paths made
    portable (:func:`portable_path`); the volatile part holds those keys at the same places and,
    under ``paths``, each path as the job recorded it (``"request.checkpoint": "/abs/…"``), so
    :func:`join_record` gives the record back.
    """
    deterministic = copy.deepcopy(record)
    volatile: dict = {}
    for keys in MOVED:
        _pop(deterministic, keys, volatile)
    paths = {}
    for keys in _path_fields(deterministic):
        parent = _get(deterministic, keys[:-1]) if len(keys) > 1 else deterministic
        original = parent[keys[-1]]
        portable = portable_path(original, root, cwd)
        if portable != original:
            parent[keys[-1]] = portable
            paths[".".join(keys)] = original
    if paths:
        volatile["paths"] = paths
    return deterministic, volatile


def join_record(deterministic: dict, volatile: dict) -> dict:
    """The job's whole record from the two parts :func:`split_record` made."""
    record = copy.deepcopy(deterministic)

    def merge(into: dict, extra: dict) -> None:
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = copy.deepcopy(value)

    merge(record, {k: v for k, v in volatile.items() if k != "paths"})
    for dotted, original in (volatile.get("paths") or {}).items():
        keys = tuple(dotted.split("."))
        parent = _get(record, keys[:-1]) if len(keys) > 1 else record
        if isinstance(parent, dict):
            parent[keys[-1]] = original
    return record


def write_split(path: PathLike, record: dict, root: PathLike) -> tuple[Path, Path]:
    """Write a job's record as ``path`` (deterministic) and its ``.provenance.json`` (volatile)."""
    from tokencache.io import write_atomic

    deterministic, volatile = split_record(record, root)
    companion = provenance_path(path)
    write_atomic(companion, volatile, format="json")
    write_atomic(path, deterministic, format="json")
    return Path(path), companion


def split_file(path: PathLike, root: PathLike) -> tuple[Path, Path]:
    """Split a whole record already written at ``path`` (e.g. by ``tokencache evaluate --out``) in place."""
    return write_split(path, json.loads(Path(path).read_text()), root)


def read_record(path: PathLike) -> dict:
    """A record of a results folder with its volatile part joined back (when its companion exists)."""
    record = json.loads(Path(path).read_text())
    companion = provenance_path(path)
    if companion.is_file():
        record = join_record(record, json.loads(companion.read_text()))
    return record


def read_provenance(path: PathLike) -> dict:
    """The volatile part of record ``path`` (``{}`` when it has no ``.provenance.json``)."""
    companion = provenance_path(path)
    return json.loads(companion.read_text()) if companion.is_file() else {}


def differing_files(a: PathLike, b: PathLike, files: Optional[Iterable[str]] = None) -> dict:
    """Files of two results folders compared byte for byte: ``same``, ``differ``, ``only_a``, ``only_b``."""
    a, b = Path(a), Path(b)
    names_a, names_b = set(result_files(a)), set(result_files(b))
    if files is not None:
        wanted = set(files)
        names_a, names_b = names_a & wanted, names_b & wanted
    both = sorted(names_a & names_b)
    same = [f for f in both if _same_bytes(a / f, b / f)]
    return {"same": same, "differ": [f for f in both if f not in set(same)], "only_a": sorted(names_a - names_b),
            "only_b": sorted(names_b - names_a)}


def _same_bytes(x: Path, y: Path) -> bool:
    if x.stat().st_size != y.stat().st_size:
        return False
    with open(x, "rb") as f, open(y, "rb") as g:
        while True:
            chunk = f.read(1 << 20)
            if chunk != g.read(1 << 20):
                return False
            if not chunk:
                return True


def main(argv=None) -> int:
    """``python -m tokencache.results RECORD RESULTS``: split a record a shell job wrote (``tokencache
    evaluate --out``) in place into the deterministic file and its ``.provenance.json``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tokencache.results", description=main.__doc__.splitlines()[0])
    parser.add_argument("record", help="the JSON a job wrote, inside the results folder")
    parser.add_argument("results", help="the results folder (results/<name>)")
    args = parser.parse_args(argv)
    if not Path(args.record).is_file():
        parser.error(f"{args.record} is not a file: give the JSON the job wrote")
    split_file(args.record, args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
