"""Do two results folders agree? Table by table, in units of each number's 95% interval.

``tokencache compare RESULTS_A RESULTS_B`` answers it for two folders of the same config — a
rerun, another machine, another CPU setting (``ATEN_CPU_CAPABILITY=avx2 …``), another thread
count — in three layers:

1. **files**: every deterministic file (:func:`tokencache.results.deterministic_files`) byte for
   byte; a faithful rerun on the same machine leaves them all identical. Volatile files
   (:data:`tokencache.results.VOLATILE`: timings, machine, load) are listed, never judged.
2. **tables**: every deterministic CSV under ``tables/`` (main, ablation, sweeps), row by row
   (rows keyed by model, sampler and method, or by setting) and column by column. A number with a
   95% interval in the table (``m`` with ``m_lo``/``m_hi``, and those ends themselves; ``d_m``
   with ``d_m_lo``/``d_m_hi``) differs by ``|B − A| / half-width``, the half-width
   ``(hi − lo) / 2`` of A's row (B's where A has none): a difference of 0.5 moves the number by
   half its own uncertainty. A number without an interval (MACs, counts) must be equal up to the
   relative ``rtol``; text must be equal; a missing row or column is a disagreement. For the
   paired differences from the reference (``d_m``) it also counts the verdicts (interval excludes
   0 or not) that changed.
3. **samples and calibrations**: how many images of the runs' ``samples.npz`` differ (and by how
   many of 255 levels), and the largest difference of a calibration file's stored tensors.

The folders *agree* when every table does within ``tolerance`` interval half-widths (default
:data:`DEFAULT_TOLERANCE`): then no number moved by more than half its own 95% uncertainty, so
no reading of the tables changes. Differing images or files do not by themselves disagree — the
tables say whether they matter.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

#: largest |difference| a number may have, in half-widths of its 95% interval, for two folders to agree
DEFAULT_TOLERANCE = 0.5
#: largest relative difference of a number without an interval (MACs, sample counts) for two folders to agree
DEFAULT_RTOL = 1e-6
#: columns that identify a row, all that a table has (the budget tables add criterion, budget, family, quality)
KEY_COLUMNS = ("model", "sampler", "method", "criterion", "budget", "family", "quality")
FALLBACK_KEYS = ("setting", "label", "note")


def check_folder(path, name: str) -> Path:
    """A results folder that exists, or one line saying what to give instead."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{name} {path} is not a folder: give the results folder of a workflow run (results/<name>)")
    return folder


# ---------------------------------------------------------------------------------- tables


def _interval(columns, column: str) -> Optional[tuple[str, str]]:
    """The (lo, hi) columns of the 95% interval that ``column`` is measured in, or None."""
    for suffix in ("_lo", "_hi"):
        if column.endswith(suffix):
            base = column[: -len(suffix)]
            if f"{base}_lo" in columns and f"{base}_hi" in columns:
                return f"{base}_lo", f"{base}_hi"
    if f"{column}_lo" in columns and f"{column}_hi" in columns:
        return f"{column}_lo", f"{column}_hi"
    return None


def _keys(table) -> list[str]:
    keys = [c for c in KEY_COLUMNS if c in table.columns]
    if keys:
        return keys
    return [next((c for c in FALLBACK_KEYS if c in table.columns), table.columns[0])]


def _number(value) -> Optional[float]:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def compare_table(path_a, path_b, tolerance: float = DEFAULT_TOLERANCE, rtol: float = DEFAULT_RTOL) -> dict:
    """One CSV table of two folders, cell by cell (see the module docstring); a JSON-ready dict.

    ``cells`` lists every cell that differs: its row key, column, both values, the difference,
    the interval half-width and the difference in half-widths (``units``; None without an
    interval), and whether it is within the tolerance. ``columns`` summarises per column.
    """
    import pandas as pd

    a, b = pd.read_csv(path_a), pd.read_csv(path_b)
    keys = _keys(a)
    result = {"table": Path(path_a).name, "keys": keys, "rows": len(a), "identical": False, "agree": True,
              "only_a_rows": [], "only_b_rows": [], "only_a_columns": [], "only_b_columns": [], "cells": [],
              "columns": [], "max_units": 0.0, "verdicts_changed": 0, "verdicts": 0}
    if any(k not in b.columns for k in keys) or a[keys].duplicated().any() or b[keys].duplicated().any():
        result.update(agree=False, error=f"rows cannot be matched by {', '.join(keys)}")
        return result
    a_rows = {tuple(str(v) for v in row): i for i, row in enumerate(a[keys].itertuples(index=False))}
    b_rows = {tuple(str(v) for v in row): i for i, row in enumerate(b[keys].itertuples(index=False))}
    result["only_a_rows"] = ["/".join(k) for k in a_rows if k not in b_rows]
    result["only_b_rows"] = ["/".join(k) for k in b_rows if k not in a_rows]
    result["only_a_columns"] = [c for c in a.columns if c not in b.columns]
    result["only_b_columns"] = [c for c in b.columns if c not in a.columns]
    shared = [k for k in a_rows if k in b_rows]
    columns = [c for c in a.columns if c in b.columns and c not in keys]
    summary = {c: {"column": c, "rows_differing": 0, "max_abs_difference": 0.0, "max_units": 0.0, "worst_row": None,
                   "interval": _interval(a.columns, c) is not None} for c in columns}
    for key in shared:
        ra, rb = a.iloc[a_rows[key]], b.iloc[b_rows[key]]
        for column in columns:
            va, vb = ra[column], rb[column]
            if (_missing(va) and _missing(vb)) or (va == vb):
                continue
            cell = {"row": "/".join(key), "column": column, "a": _plain(va), "b": _plain(vb), "difference": None,
                    "half_width": None, "units": None, "within": False}
            na, nb = _number(va), _number(vb)
            numeric = na is not None and nb is not None and not (isinstance(va, str) or isinstance(vb, str))
            if numeric and not (math.isnan(na) or math.isnan(nb)):
                diff = nb - na
                cell["difference"] = diff
                interval = _interval(a.columns, column)
                if interval is not None:
                    half = _half_width(ra, interval)
                    if half is None:
                        half = _half_width(rb, interval)
                    cell["half_width"] = half
                    if half is not None:
                        cell["units"] = abs(diff) / half if half > 0 else (0.0 if diff == 0 else math.inf)
                        cell["within"] = cell["units"] <= tolerance
                if cell["half_width"] is None:
                    cell["within"] = abs(diff) <= rtol * max(abs(na), abs(nb))
                col = summary[column]
                col["rows_differing"] += 1
                if abs(diff) > col["max_abs_difference"]:
                    col["max_abs_difference"] = abs(diff)
                    if cell["units"] is None:
                        col["worst_row"] = cell["row"]
                if cell["units"] is not None and cell["units"] >= col["max_units"]:
                    col["max_units"] = cell["units"]
                    col["worst_row"] = cell["row"]
            else:
                summary[column]["rows_differing"] += 1
                summary[column]["worst_row"] = summary[column]["worst_row"] or cell["row"]
            result["cells"].append(cell)
    result["columns"] = [c for c in summary.values() if c["rows_differing"]]
    result["max_units"] = max([c["units"] for c in result["cells"] if c["units"] is not None], default=0.0)
    changed, total = _verdicts(a, b, a_rows, b_rows, shared)
    result["verdicts_changed"], result["verdicts"] = changed, total
    result["agree"] = (not result["only_a_rows"] and not result["only_b_rows"] and not result["only_a_columns"]
                       and not result["only_b_columns"] and all(c["within"] for c in result["cells"]))
    return result


def _plain(value):
    """A cell as JSON can hold it (numpy scalars to Python)."""
    return value.item() if hasattr(value, "item") else value


def _half_width(row, interval: tuple[str, str]) -> Optional[float]:
    lo, hi = _number(row[interval[0]]), _number(row[interval[1]])
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return None
    return (hi - lo) / 2


def _verdicts(a, b, a_rows, b_rows, shared) -> tuple[int, int]:
    """Paired differences (``d_m_lo``/``d_m_hi``) whose verdict — the interval excludes 0 — changed."""
    changed = total = 0
    for lo in [c for c in a.columns if c.startswith("d_") and c.endswith("_lo") and c in b.columns]:
        hi = lo[:-3] + "_hi"
        if hi not in a.columns or hi not in b.columns:
            continue
        for key in shared:
            ra, rb = a.iloc[a_rows[key]], b.iloc[b_rows[key]]
            values = [_number(ra[lo]), _number(ra[hi]), _number(rb[lo]), _number(rb[hi])]
            if any(v is None or math.isnan(v) for v in values):
                continue
            total += 1
            changed += ((values[0] > 0 or values[1] < 0) != (values[2] > 0 or values[3] < 0))
    return changed, total


# ---------------------------------------------------------------------------------- samples, calibrations


def sample_differences(a: Path, b: Path) -> dict:
    """Images of the runs' ``samples.npz`` (where both folders have one) that differ, and by how much."""
    import numpy as np

    runs = images = total = worst = files = 0
    which = []
    for path in sorted(a.glob("runs/*/*/*/samples.npz")):
        twin = b / path.relative_to(a)
        if not twin.is_file():
            continue
        files += 1
        with np.load(path) as x, np.load(twin) as y:
            xa, ya = x["arr_0"].astype(np.int16), y["arr_0"].astype(np.int16)
        if xa.shape != ya.shape:
            runs += 1
            images += len(xa)
            total += len(xa)
            which.append(f"{'/'.join(path.parts[-4:-1])} (other shape)")
            continue
        diff = np.abs(xa - ya).reshape(len(xa), -1).max(axis=1)
        total += len(xa)
        if diff.any():
            runs += 1
            images += int((diff > 0).sum())
            worst = max(worst, int(diff.max()))
            which.append(f"{'/'.join(path.parts[-4:-1])} ({int((diff > 0).sum())})")
    return {"runs": files, "runs_differing": runs, "images": total, "images_differing": images,
            "max_pixel_difference": worst, "which": which}


def calibration_differences(a: Path, b: Path) -> dict:
    """The largest absolute difference of a stored tensor between calibration files of both folders."""
    import torch

    from tokencache.cache.calibration import read_calibration_file

    files, worst, where = 0, 0.0, None
    for path in sorted(a.glob("calibration/**/*.pt")):
        twin = b / path.relative_to(a)
        if not twin.is_file():
            continue
        files += 1
        ta, tb = read_calibration_file(path).get("tensors", {}), read_calibration_file(twin).get("tensors", {})
        for name in sorted(set(ta) & set(tb)):
            x, y = ta[name], tb[name]
            if not (torch.is_tensor(x) and torch.is_tensor(y)) or x.shape != y.shape:
                continue
            d = float((x.double() - y.double()).abs().max()) if x.numel() else 0.0
            if d > worst:
                worst, where = d, f"{path.relative_to(a).as_posix()}:{name}"
    return {"files": files, "max_tensor_difference": worst, "where": where}


# ---------------------------------------------------------------------------------- folders


def compare_results(a, b, tolerance: float = DEFAULT_TOLERANCE, rtol: float = DEFAULT_RTOL) -> dict:
    """Two results folders, file by file and table by table; ``agree`` is the verdict (module docstring)."""
    from tokencache.results import differing_files, is_volatile, result_files

    a, b = check_folder(a, "RESULTS_A"), check_folder(b, "RESULTS_B")
    names = set(result_files(a)) | set(result_files(b))
    deterministic = sorted(n for n in names if not is_volatile(n))
    volatile = sorted(n for n in names if is_volatile(n))
    files = differing_files(a, b, deterministic)
    volatile_files = differing_files(a, b, volatile)
    tables = []
    for name in sorted(n for n in deterministic if n.startswith("tables/") and n.endswith(".csv")):
        if (a / name).is_file() and (b / name).is_file():
            table = compare_table(a / name, b / name, tolerance, rtol)
            table["table"] = name
            table["identical"] = name in files["same"]
            tables.append(table)
    missing_tables = [n for n in files["only_a"] + files["only_b"] if n.startswith("tables/") and n.endswith(".csv")]
    return {"a": str(a), "b": str(b), "tolerance": tolerance, "rtol": rtol,
            "identical": not files["differ"] and not files["only_a"] and not files["only_b"],
            "agree": all(t["agree"] for t in tables) and not missing_tables,
            "files": {"deterministic": len(deterministic), "same": len(files["same"]), "differ": files["differ"],
                      "only_a": files["only_a"], "only_b": files["only_b"]},
            "volatile": {"files": len(volatile), "differ": volatile_files["differ"],
                         "only_a": volatile_files["only_a"], "only_b": volatile_files["only_b"]},
            "missing_tables": missing_tables, "tables": tables,
            "samples": sample_differences(a, b), "calibrations": calibration_differences(a, b)}


def _listing(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" … (+{len(names) - limit})" if len(names) > limit else "")


def summary_text(report: dict) -> str:
    """The human summary of :func:`compare_results`: files, samples, calibrations, then each table."""
    lines = [f"A: {report['a']}", f"B: {report['b']}"]
    f, v = report["files"], report["volatile"]
    text = f"files: {f['same']} of {f['deterministic']} deterministic files identical"
    for label, names in (("differ", f["differ"]), ("only in A", f["only_a"]), ("only in B", f["only_b"])):
        if names:
            text += f"; {len(names)} {label}: {_listing(names)}"
    lines.append(text)
    lines.append(f"volatile files (not judged: timings, machine, load): {v['files']}, of which "
                 f"{len(v['differ']) + len(v['only_a']) + len(v['only_b'])} differ or are in one folder only")
    s = report["samples"]
    if s["runs"]:
        lines.append(f"samples: {s['images_differing']} of {s['images']} images differ, in {s['runs_differing']} of "
                     f"{s['runs']} runs, by at most {s['max_pixel_difference']} of 255"
                     + (f" ({_listing(s['which'])})" if s["which"] else ""))
    c = report["calibrations"]
    if c["files"]:
        lines.append(f"calibrations: {c['files']} files, largest difference of a stored tensor "
                     f"{c['max_tensor_difference']:.3g}" + (f" ({c['where']})" if c["where"] else ""))
    for name in report["missing_tables"]:
        lines.append(f"table {name}: in one folder only — disagree")
    for t in report["tables"]:
        lines.append(_table_line(t, report["tolerance"]))
        if not t["identical"] and t["columns"]:
            for col in t["columns"]:
                units = (f", {col['max_units']:.3g} half-widths" if col["interval"] else ", no interval")
                lines.append(f"    {col['column']}: {col['rows_differing']} rows differ, largest "
                             f"{col['max_abs_difference']:.3g}{units} ({col['worst_row']})")
    verdict = "identical" if report["identical"] else ("agree" if report["agree"] else "disagree")
    lines.append(f"verdict: {verdict} (tolerance {report['tolerance']:g} interval half-widths; numbers without an "
                 f"interval within a relative {report['rtol']:g})")
    return "\n".join(lines)


def _table_line(t: dict, tolerance: float) -> str:
    name = t["table"]
    if t.get("error"):
        return f"table {name}: disagree — {t['error']}"
    if t["identical"]:
        return f"table {name}: identical ({t['rows']} rows)"
    parts = []
    for label, items in (("rows only in A", t["only_a_rows"]), ("rows only in B", t["only_b_rows"]),
                         ("columns only in A", t["only_a_columns"]), ("columns only in B", t["only_b_columns"])):
        if items:
            parts.append(f"{label}: {_listing(items)}")
    outside = [c for c in t["cells"] if not c["within"]]
    parts.append(f"{len(t['cells'])} cells differ, largest {t['max_units']:.3g} interval half-widths")
    if outside:
        worst = outside[0]
        parts.append(f"{len(outside)} beyond the tolerance (e.g. {worst['column']} of {worst['row']}: "
                     f"{worst['a']} → {worst['b']})")
    if t["verdicts"]:
        parts.append(f"paired verdicts changed: {t['verdicts_changed']} of {t['verdicts']}")
    return f"table {name}: {'agree' if t['agree'] else 'disagree'} — " + "; ".join(parts)
