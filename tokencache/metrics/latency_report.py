"""The GPU latency report: ``tokencache latency --out`` JSON files → latency.csv, latency.md, a plot.

One row per (model, sampler, configuration, method, batch size). A configuration is what the
provenance says moves the numbers (device, dtype, weight dtype, TF32, compile mode), so runs
of several models, samplers and settings can share one table without being mixed up. The plot
shows the realization ratio (latency speed-up ÷ MACs speed-up) against the batch
size, one panel per (model, sampler, configuration), one line per method: the question it
answers is at which batch size a method's MAC savings turn into time.

Usage (also ``tokencache latency-report``)::

    write_latency_report(["results/gpu/DiT-XL-2_ddim50.json", ...], "results/gpu")
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence, Union

import pandas as pd

#: the report's columns, units in the names.
REPORT_COLUMNS = ["model", "sampler", "device_name", "dtype", "weights_dtype", "tf32", "compile_mode", "label",
                  "method", "batch_size", "run_sampler", "sampling_median_s", "sampling_iqr_s", "images_per_s",
                  "speedup", "macs_g_per_image", "macs_speedup", "realization_ratio", "decision_share", "host_sync",
                  "end_to_end_median_s", "peak_memory_mib", "warmup_max_s", "note"]
#: the short table printed by ``tokencache latency-report``
SHORT_COLUMNS = ["model", "compile_mode", "label", "batch_size", "speedup", "macs_speedup", "realization_ratio",
                 "images_per_s", "peak_memory_mib"]
#: the columns that tell configurations apart (one plot panel each).
CONFIG_COLUMNS = ["model", "sampler", "device_name", "dtype", "weights_dtype", "tf32", "compile_mode"]

PathLike = Union[str, Path]


def load_latency_rows(paths: Iterable[PathLike]) -> list[dict]:
    """The rows of every ``{"rows": [...]}`` JSON file (a list of rows is accepted too), in order."""
    rows = []
    for path in paths:
        obj = json.loads(Path(path).read_text())
        found = obj["rows"] if isinstance(obj, dict) else obj
        if not isinstance(found, list) or not all(isinstance(r, dict) and "sampling_s" in r for r in found):
            raise ValueError(f"{path} is not the JSON of `tokencache latency --out`")
        rows.extend(found)
    if not rows:
        raise ValueError("no latency rows in the given files")
    return rows


def report_table(rows: Sequence[dict]) -> pd.DataFrame:
    """The rows as a flat table (:data:`REPORT_COLUMNS`), sorted by configuration, method order, batch."""
    flat = []
    for order, r in enumerate(rows):
        prov = r.get("provenance", {})
        flat.append({
            "model": r.get("model") or "?", "sampler": r["requested_sampler"],
            "device_name": prov.get("device_name"), "dtype": prov.get("dtype"),
            "weights_dtype": prov.get("weights_dtype", "float32"), "tf32": prov.get("tf32_matmul"),
            "compile_mode": prov.get("compile_mode", "none"), "label": r["label"], "method": r["method"],
            "batch_size": r["batch_size"], "run_sampler": r["sampler"],
            "sampling_median_s": r["sampling_s"]["median"], "sampling_iqr_s": r["sampling_s"]["iqr"],
            "images_per_s": r["images_per_s"], "speedup": r["speedup"],
            "macs_g_per_image": r["macs_per_image"] / 1e9, "macs_speedup": r["macs_speedup"],
            "realization_ratio": r["realization_ratio"], "decision_share": r.get("decision_share"),
            "host_sync": r.get("host_sync"), "end_to_end_median_s": r["end_to_end_s"]["median"],
            "peak_memory_mib": None if r.get("peak_memory_bytes") is None else r["peak_memory_bytes"] / 2**20,
            "warmup_max_s": max(r["warmup_sampling_s"]) if r.get("warmup_sampling_s") else None,
            "note": r.get("note"), "_order": order,
        })
    table = pd.DataFrame(flat)
    first = table.groupby("label", sort=False)["_order"].transform("min")  # keep the methods' given order
    table = table.assign(_first=first).sort_values(CONFIG_COLUMNS + ["_first", "batch_size"], kind="stable")
    return table[REPORT_COLUMNS].reset_index(drop=True)


def short_table(table: pd.DataFrame) -> str:
    """The report's key columns as plain text (what ``tokencache latency-report`` prints last)."""
    shown = table[SHORT_COLUMNS].rename(columns={"compile_mode": "compile", "batch_size": "batch",
                                                 "macs_speedup": "macs_x", "realization_ratio": "realization",
                                                 "images_per_s": "img/s", "peak_memory_mib": "peak_MiB"})
    return shown.to_string(index=False, float_format=lambda v: f"{v:.3g}")


def _config_name(key: tuple) -> str:
    model, sampler, device, dtype, weights, tf32, compile_mode = key
    parts = [f"{model} {sampler}", str(device), f"{dtype} (weights {weights})", f"TF32 {'on' if tf32 else 'off'}",
             f"compile {compile_mode}"]
    return ", ".join(parts)


def plot_realization(table: pd.DataFrame, path: PathLike) -> None:
    """Realization ratio against batch size (log scale), a panel per configuration, a line per method."""
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    groups = list(table.groupby(CONFIG_COLUMNS, sort=False, dropna=False))
    cols = min(2, len(groups))
    nrows = -(-len(groups) // cols)
    fig = Figure(figsize=(7.6 * cols, 4.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    labels = list(dict.fromkeys(table["label"]))  # one colour and marker per method across the panels
    colours = matplotlib.colormaps["tab20" if len(labels) > 10 else "tab10"]
    markers = "os^vDP*Xh<>p"
    style = {label: dict(color=colours(i % colours.N), marker=markers[i % len(markers)]) for i, label in enumerate(labels)}
    for ax, (key, group) in zip(axes, groups):
        for label, line in group.groupby("label", sort=False):
            line = line.dropna(subset=["realization_ratio"])
            if len(line):
                ax.plot(line["batch_size"], line["realization_ratio"], label=label, **style[label])
        ax.axhline(1.0, color="0.6", linewidth=0.8, linestyle="--")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(group["batch_size"].unique()), [str(b) for b in sorted(group["batch_size"].unique())])
        ax.set_xlabel("images per batch (CFG doubles the rows)")
        ax.set_ylabel("realization ratio (speed-up ÷ MACs speed-up)")
        ax.set_title(_config_name(key), fontsize=9)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    from tokencache.io import write_atomic

    write_atomic(path, format=lambda f: fig.savefig(f, format="png", dpi=120))


def _provenance_lines(rows: Sequence[dict]) -> list[str]:
    """One line per distinct provenance (the repeated per-row copies collapsed)."""
    keep = ("device_name", "driver_version", "torch", "cuda_version", "cudnn_version", "dtype", "weights_dtype",
            "float32_matmul_precision", "tf32_matmul", "tf32_cudnn", "sdpa_backend", "compile_mode",
            "compile_backend", "cuda_graphs", "compile_warmup_s", "graphs_compiled", "graphs_compiled_while_timing",
            "timer", "cpu_threads", "git_commit")
    seen, lines = set(), []
    for r in rows:
        prov = r.get("provenance", {})
        text = ", ".join(f"{k}={prov[k]}" for k in keep if k in prov)
        key = (r.get("model"), r["requested_sampler"], text)
        if key not in seen:
            seen.add(key)
            lines.append(f"- {r.get('model')} {r['requested_sampler']}: {text}")
    return lines


def _machine_lines(paths: Sequence[PathLike]) -> list[str]:
    """Per input file: the CPU, threads and the load average around the timing (is it to be trusted?)."""
    lines = []
    for path in paths:
        obj = json.loads(Path(path).read_text())
        machine = obj.get("machine") if isinstance(obj, dict) else None
        if not machine:
            continue
        prov = machine.get("provenance", {})
        noisy = machine.get("noisy_rows") or []
        lines.append(f"- {Path(path).name}: {prov.get('cpu_model', '?')} ({prov.get('cpu_capability', '?')}), "
                     f"{machine.get('cpus_available')} CPUs available, {machine.get('threads')} threads; load average "
                     f"{machine.get('load_average_before')} before, {machine.get('load_average_after')} after"
                     + ("; **busy before timing**" if machine.get("busy_before") else "")
                     + (f"; noisy rows ({machine.get('noisy_spread')}): {', '.join(map(str, noisy))}" if noisy else ""))
    return lines


def write_latency_report(paths: Iterable[PathLike], out_dir: PathLike) -> dict:
    """Write ``latency.csv``, ``latency.md`` and ``realization_ratio.png`` into ``out_dir``.

    Returns {"csv", "md", "plot", "rows", "configurations"}. Rows that were timed while graphs
    were still compiling (``graphs_compiled_while_timing`` > 0) are flagged in the Markdown.
    """
    paths = list(paths)
    rows = load_latency_rows(paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = report_table(rows)
    csv, md, plot = out / "latency.csv", out / "latency.md", out / "realization_ratio.png"
    from tokencache.io import write_atomic

    write_atomic(csv, table.to_csv(index=False))
    plot_realization(table, plot)
    recompiled = sorted({f"{r.get('model')} {r['requested_sampler']}" for r in rows
                         if (r.get("provenance", {}).get("graphs_compiled_while_timing") or 0) > 0})
    lines = ["# Latency", "",
             "Sampling loop (transformer, CFG included) timed side by side in one process; median of the "
             "repeats, IQR beside it. speedup: over the uncached reference at the same batch size; macs_speedup: from the "
             "engine's token counts; realization_ratio = speedup ÷ macs_speedup; decision_share: the time "
             "spent in the method's own decisions (scores, signals, forecasts, predictor), measured in a round "
             "of its own, as a share of that round's sampling time; host_sync: the method reads device values "
             "on the host while sampling. Plot: "
             f"[{plot.name}]({plot.name}).", ""]
    if recompiled:
        lines += [f"**Warning**: graphs were compiled while timing for {', '.join(recompiled)}; "
                  "those numbers include compile time (use more warm-up rounds).", ""]
    for key, group in table.groupby(CONFIG_COLUMNS, sort=False, dropna=False):
        shown = group.drop(columns=CONFIG_COLUMNS + ([] if group["note"].notna().any() else ["note"]))
        lines += [f"## {_config_name(key)}", "", shown.to_markdown(index=False, floatfmt=".4g"), ""]
    lines += ["## Provenance", "", *_provenance_lines(rows)]
    machine = _machine_lines(paths)
    if machine:
        lines += ["", "## Machine while timing", "", *machine]
    write_atomic(md, "\n".join(lines) + "\n")
    return {"csv": str(csv), "md": str(md), "plot": str(plot), "rows": len(table),
            "configurations": int(table.groupby(CONFIG_COLUMNS, dropna=False).ngroups), "short": short_table(table)}
