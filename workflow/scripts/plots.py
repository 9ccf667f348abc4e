"""Figures of a finished workflow run, read from ``tables/main.csv`` (``tables/latency.csv`` for the
measured speed-up) and the runs' ``run.json``.

* ``pareto_macs.png`` / ``pareto_latency.png``: speed-up (MACs / measured latency) against FID,
  one panel per model and sampler, one curve per *method* through its run labels (a sweep over
  caching strength; a label is written beside its point unless it is the method's name) in order
  of speed-up. The method whose role is "fewer-steps" (starting from the uncached model) is the
  dashed grey curve every cache has to beat; the "reference" (uncached) run is the star at 1×.
  The Pareto front of all points of a panel (nothing is both faster and better) is the thick band.
  ``pareto_latency.png`` draws this machine's measured time: it is volatile
  (``tokencache.results.VOLATILE``), every other figure is deterministic.
  Tuned runs (label ``FAMILY@SLUG``, the non-dominated points of a family's search space that the
  tuning stage selected) form one curve per *family* instead, without a label per point: several
  families can share a cache method (``tokencache`` and ``tokencache-v2``), and their fronts are
  different curves.
* ``pareto_psnr.png``: MACs speed-up against PSNR to the reference run's images (fidelity; the
  metric that separates methods on the testbed, where FID of a few hundred samples is noisy);
  images identical to their uncached twin count at the PSNR cap, where the reference is drawn.

Every speed/quality figure draws every row of the main table, with its 95% bootstrap interval
as a vertical bar (``main`` returns the points, so the tests can check that none is missing).
* ``macs_vs_fid.png``: MACs per generated image (CFG included) against FID, the same curves.
* ``token_fraction.png``: per sampling step, the fraction of tokens a run computed (attention
  and MLP of every block; 1 = a full step), one row per model and sampler, one column per method.
* ``calibration.png`` (only when runs use calibration files): what each trained or fitted part
  learned, one panel per file, drawn by its method's calibration (``Calibration.figure``).
* ``tuning.png`` (only with a tuning stage): the tuning seeds' view, from each
  ``tuning/<model>/<sampler>/front.json``: every point of every family's search space (faint)
  and each family's non-dominated points joined by a line, MACs speed-up against PSNR to full.

Every figure is written atomically (a temporary file, then a rename).
"""
import json
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter, NullLocator  # noqa: E402

#: roles drawn first and in a fixed colour; every other method gets the next palette colour
FIRST_ROLES = ["reference", "fewer-steps"]
ROLE_COLOURS = {"reference": "black", "fewer-steps": "0.45"}
ROLE_LEGEND = {"reference": "(no caching)", "fewer-steps": "(fewer sampling steps)"}
LINESTYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "D", "^", "v", "P", "X", "<", ">"]
#: legend entries one column holds beside a row of panels before it reaches the title
LEGEND_ROWS = 14


#: a first title line on every figure (a rehearsal's "stand-in weights" line; main() sets it)
BANNER = ""


def with_banner(fig, banner: str) -> None:
    """Put ``banner`` above the figure's title, in red, so that no reader takes it for a result."""
    if banner:
        title = fig._suptitle.get_text() if fig._suptitle is not None else ""
        fig.suptitle(f"{banner}\n{title}".rstrip(), color="firebrick", fontsize=13)


def save_atomic(fig, path) -> None:
    """Save a figure as PNG atomically (:func:`tokencache.io.write_atomic`), then close it."""
    from tokencache.io import write_atomic

    with_banner(fig, BANNER)
    try:
        write_atomic(path, format=lambda f: fig.savefig(f, format="png", dpi=150, bbox_inches="tight"))
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------- data


def load_points(table_csv, run_paths) -> tuple[pd.DataFrame, dict]:
    """The main table with each label's method name and curve, and every run's JSON by (model, sampler, label)."""
    table = pd.read_csv(table_csv).rename(columns={"method": "label"})
    runs = {}
    for path in run_paths:
        parts = Path(path).parts
        runs[(parts[-4], parts[-3], parts[-2])] = json.loads(Path(path).read_text())
    keys = list(zip(table.model, table.sampler, table.label))
    table["method"] = [runs[key]["cache"]["method"] for key in keys]
    table["role"] = [runs[key]["cache"].get("role", "cache") for key in keys]
    table["curve"] = curve_names(table)
    return table, runs


def family_of(label: str):
    """The family of a tuned run's label ``FAMILY@SLUG``; None when hand-picked (tokencache.tuning.split_label)."""
    from tokencache.tuning import split_label

    return split_label(label)[0]


def curve_names(table: pd.DataFrame) -> list[str]:
    """The curve of each row: its family for a tuned run, its cache method for a hand-picked one.

    Families, not methods, for tuned runs: two families of one method (``tokencache`` and
    ``tokencache-v2``) are two search spaces and two fronts. A family named like a hand-picked
    run's method becomes ``FAMILY (tuned)``, so that a front is never joined to hand-picked points.
    """
    families = [family_of(str(label)) for label in table.label]
    hand_picked = {m for m, f in zip(table.method, families) if f is None}
    return [m if f is None else (f"{f} (tuned)" if f in hand_picked else f) for m, f in zip(table.method, families)]


def curve_of(table: pd.DataFrame) -> pd.Series:
    """Each row's curve (:func:`curve_names`); its method for a table loaded without curves."""
    return table["curve"] if "curve" in table else table["method"]


def image_values(model_config: dict) -> int:
    """Values per saved image (H·W·3) of a run's model: latent models decode to 8× their latent side."""
    side = int(model_config["input_size"]) * (8 if model_config.get("in_channels") == 4 else 1)
    return side * side * 3


def method_styles(table: pd.DataFrame) -> dict:
    """Curve (method, or tuned family) → (colour, marker, role), the same in every figure; the reference
    black, fewer steps grey."""
    roles = dict(zip(curve_of(table), table.role))
    first = [m for role in FIRST_ROLES for m in sorted(roles) if roles[m] == role]
    ordered = first + sorted(set(roles) - set(first))
    coloured = [m for m in ordered if roles[m] not in ROLE_COLOURS]
    # the colour-blind palette has ten colours: beyond that, tab20's pairs, so that no two curves share one
    name = "colorblind" if len(coloured) <= 10 else "tab20"
    palette = iter(sns.color_palette(name, n_colors=max(1, len(coloured))))
    styles = {}
    for i, method in enumerate(ordered):
        colour = ROLE_COLOURS.get(roles[method]) or next(palette)
        styles[method] = (colour, "*" if roles[method] == "reference" else MARKERS[i % len(MARKERS)], roles[method])
    return styles


def panels(table: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Models (rows) and samplers (columns) in the table's order."""
    return list(dict.fromkeys(table.model)), list(dict.fromkeys(table.sampler))


def pareto_front(x: np.ndarray, y: np.ndarray, maximize_x: bool) -> np.ndarray:
    """Indices of the points no other point beats on both axes (y = FID, lower is better), by x."""
    sign = 1.0 if maximize_x else -1.0
    keep = []
    for i in range(len(x)):
        dominated = any((sign * x[j] >= sign * x[i]) and (y[j] <= y[i]) and (x[j] != x[i] or y[j] != y[i])
                        for j in range(len(x)))
        if not dominated:
            keep.append(i)
    return np.array(sorted(keep, key=lambda i: x[i]), dtype=int)


# ---------------------------------------------------------------------------------- figures


def log_axis(axis, set_scale, values, unit: str) -> None:
    """A log axis with plain-number ticks at 1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8 × 10^k within ``values``."""
    set_scale("log")
    lo, hi = float(np.min(values)), float(np.max(values))
    decades = range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
    candidates = [m * 10.0 ** k for k in decades for m in (1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8)]
    ticks = [t for t in candidates if lo / 1.08 <= t <= hi * 1.08]
    if len(ticks) > 8:  # keep every other tick, always including the first
        ticks = ticks[::2]
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}{unit}"))
    axis.set_minor_locator(NullLocator())
    axis.set_minor_formatter(NullFormatter())


def plot_points(table: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """The points a speed/quality figure draws: one per table row, with its error bar.

    Every row of the table is a point. The bar of a cached run is the paired 95% interval of
    its difference from the reference (``d_<y>_lo``/``_hi``), placed around its value: runs of one
    model and sampler share their samples' noise and labels, so that is the interval that
    compares them (a run's own interval over the samples, ``<y>_lo``/``_hi`` in the table, is
    mostly the variation all runs share). Without a paired interval (PSNR and SSIM, which are
    already paired image by image, and the reference itself) the run's own interval is drawn.
    For ``psnr_to_full`` the reference run (no fidelity to itself in the table) sits at the PSNR
    cap of identical images (``tokencache.metrics.fidelity.psnr_cap``).
    """
    points = table.copy()
    lo, hi = f"{y}_lo", f"{y}_hi"
    points["y_lo"] = points[lo] if lo in points else np.nan
    points["y_hi"] = points[hi] if hi in points else np.nan
    if f"d_{y}_lo" in points:
        paired = points[f"d_{y}_lo"].notna() & (points.role != "reference")
        shift = points[y] - points[f"d_{y}"]
        points.loc[paired, "y_lo"] = (shift + points[f"d_{y}_lo"])[paired]
        points.loc[paired, "y_hi"] = (shift + points[f"d_{y}_hi"])[paired]
    if y == "psnr_to_full":
        from tokencache.metrics.fidelity import psnr_cap

        size = points.get("image_values")
        for i, r in points[points.role == "reference"].iterrows():
            values = int(size[i]) if size is not None and pd.notna(size[i]) else None
            cap = psnr_cap(values) if values else points[y].max()
            points.at[i, y], points.at[i, "y_lo"], points.at[i, "y_hi"] = cap, cap, cap
    return points


def speed_quality_figure(table: pd.DataFrame, styles: dict, x: str, xlabel: str, title: str,
                         maximize_x: bool, out, y: str = "fid", ylabel: str = "FID (lower is better)") -> pd.DataFrame:
    """A quality column ``y`` against a cost axis, one panel per model and sampler, one curve per method
    (per family for tuned runs: :func:`curve_names`).

    ``maximize_x``: True for a speed-up (1× = full, better to the right), False for MACs.
    ``y`` = "fid" (lower is better) or "psnr_to_full" (fidelity to the uncached images, higher is
    better; identical images are capped, and the reference sits at the cap). Vertical bars are the 95%
    bootstrap intervals. Returns the points drawn (every table row), which the tests check.
    """
    higher_is_better = y != "fid"
    table = plot_points(table, x, y)
    drawn = []
    models, samplers = panels(table)
    legend_columns = 2 if len(styles) + 2 > LEGEND_ROWS else 1  # one column taller than the panels overlaps the title
    fig, axes = plt.subplots(len(models), len(samplers), squeeze=False, constrained_layout=True,
                             figsize=(5.6 * len(samplers) + 3 * legend_columns, max(4.4 * len(models), 5.5)))
    for r, model in enumerate(models):
        for c, sampler in enumerate(samplers):
            ax = axes[r, c]
            sub = table[(table.model == model) & (table.sampler == sampler)]
            sub = sub[np.isfinite(sub[x].astype(float)) & np.isfinite(sub[y].astype(float))]
            if sub.empty:
                ax.set_axis_off()
                continue
            drawn.append(sub)
            bars = sub[np.isfinite(sub.y_lo.astype(float)) & np.isfinite(sub.y_hi.astype(float))]
            for method, (colour, _, _) in styles.items():
                part = bars[curve_of(bars) == method]
                if not part.empty:
                    ax.errorbar(part[x], part[y], yerr=[(part[y] - part.y_lo).clip(lower=0),
                                                        (part.y_hi - part[y]).clip(lower=0)],
                                fmt="none", ecolor=colour, elinewidth=1.0, capsize=2.5, alpha=0.55, zorder=2)
            sign = -1.0 if higher_is_better else 1.0
            front = sub.iloc[pareto_front(sub[x].to_numpy(), sign * sub[y].to_numpy(), maximize_x)]
            ax.plot(front[x], front[y], color="gold", lw=9, alpha=0.45, solid_capstyle="round", zorder=1)
            ax.scatter(front[x], front[y], s=260, color="gold", alpha=0.6, lw=0, zorder=1)
            full = sub[sub.role == "reference"]
            for method, (colour, marker, role) in styles.items():
                curve = sub[curve_of(sub) == method]
                if curve.empty or role == "reference":
                    continue
                if role == "fewer-steps" and not higher_is_better:  # fewer steps start from the full model
                    curve = pd.concat([full, curve])
                curve = curve.sort_values(x)
                ax.plot(curve[x], curve[y], color=colour, marker=marker, ms=6, lw=1.6, zorder=3,
                        ls="--" if role == "fewer-steps" else "-")
                tuned = curve.label.str.contains("@", regex=False)  # a front's points are too many to name
                for _, p in curve[(curve_of(curve) == method) & (curve.label != method) & ~tuned].iterrows():
                    ax.annotate(p.label, (p[x], p[y]), xytext=(4, 3), textcoords="offset points", fontsize=7,
                                color="0.3")
            others = sub[sub.role != "reference"]
            full_y = full[y]
            if higher_is_better and not full.empty and not others.empty:
                # full sits at the PSNR cap, far above the rest: clip the axis just above the runs and
                # show full on its top edge
                top = float(np.nanmax(others[["y_hi", y]].to_numpy(dtype=float)))
                bottom = float(np.nanmin(others[["y_lo", y]].to_numpy(dtype=float)))
                if full[y].max() > top + 0.25 * (top - bottom):
                    margin = 0.08 * max(top - bottom, 1.0)
                    ax.set_ylim(bottom - margin, top + margin)
                    full_y = pd.Series([top + margin] * len(full), index=full.index)
                    ax.annotate(f"{full.label.iloc[0]}: {full[y].max():.1f} dB (identical)",
                                (full[x].iloc[0], top + margin),
                                xytext=(8, -10), textcoords="offset points", fontsize=7, color="0.2")
            if not full.empty:
                ax.scatter(full[x], full_y, marker="*", s=220, color="black", zorder=5, clip_on=False)
            log_axis(ax.xaxis, ax.set_xscale, sub[x], "×" if maximize_x else "")
            if not higher_is_better and sub[y].max() > 4 * max(sub[y].min(), 1e-9):
                log_axis(ax.yaxis, ax.set_yscale, sub[y], "")
            ax.set_title(f"{model} · {sampler}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
    handles = [Line2D([], [], color=colour, marker=marker, ms=12 if role == "reference" else 6,
                      ls="none" if role == "reference" else ("--" if role == "fewer-steps" else "-"),
                      label=f"{method} {ROLE_LEGEND[role]}" if role in ROLE_LEGEND else method)
               for method, (colour, marker, role) in styles.items()]
    handles.append(Line2D([], [], color="gold", lw=9, alpha=0.45, label="Pareto front (all points)"))
    handles.append(Line2D([], [], color="0.4", marker="|", ms=10, ls="none",
                          label="95% interval (paired with the reference)" if f"d_{y}_lo" in table
                          else "95% interval"))
    fig.legend(handles=handles, loc="outside right center", title="method", frameon=False, ncols=legend_columns)
    fig.suptitle(title, fontsize=14)
    save_atomic(fig, out)
    return pd.concat(drawn) if drawn else table.iloc[0:0]


def token_fraction_figure(table: pd.DataFrame, runs: dict, styles: dict, out) -> None:
    """Per-step fraction of computed tokens: rows = model · sampler, columns = caching methods.

    The reference (uncached) run is the dotted line at 1; fewer steps are left out (they compute
    every token of fewer steps: the saving is in the step count, not in tokens).
    """
    methods = [m for m, style in styles.items() if style[2] == "cache"]
    reference = [m for m, style in styles.items() if style[2] == "reference"]
    combos = list(dict.fromkeys(zip(table.model, table.sampler)))
    if not methods:
        methods = reference
    fig, axes = plt.subplots(len(combos), len(methods), figsize=(3.6 * len(methods), 3.0 * len(combos) + 0.6),
                             squeeze=False, sharey=True, constrained_layout=True)
    for r, (model, sampler) in enumerate(combos):
        for c, method in enumerate(methods):
            ax = axes[r, c]
            sub = table[(table.model == model) & (table.sampler == sampler) & (curve_of(table) == method)]
            full = table[(table.model == model) & (table.sampler == sampler) & (table.role == "reference")]
            if not full.empty:
                label = full.label.iloc[0]
                steps = len(runs[(model, sampler, label)]["cache"]["per_step"]["token_fraction"])
                ax.plot([1, steps], [1, 1], color="black", lw=1, ls=":", label=label)
            for i, label in enumerate(sub.label):
                fraction = runs[(model, sampler, label)]["cache"]["per_step"]["token_fraction"]
                ax.plot(np.arange(1, len(fraction) + 1), fraction, drawstyle="steps-mid", color=styles[method][0],
                        ls=LINESTYLES[i % len(LINESTYLES)], lw=1.5, label=label)
            if sub.empty:
                ax.text(0.5, 0.5, "not run", transform=ax.transAxes, ha="center", va="center", color="0.5")
            ax.set_ylim(-0.03, 1.05)
            ax.set_title(f"{method}\n{model} · {sampler}", fontsize=10)
            ax.set_xlabel("sampling step")
            if c == 0:
                ax.set_ylabel("tokens computed (fraction)")
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, fontsize=7, frameon=False)
    fig.suptitle("Fraction of tokens computed per sampling step (1 = full step; step 1 is the noisiest)",
                 fontsize=13)
    save_atomic(fig, out)


def calibration_figure(files: list[str], out) -> None:
    """One panel per calibration file, drawn by the calibration of the method that made it."""
    from tokencache.cache import method_class
    from tokencache.cache.calibration import read_calibration_file

    n = len(files)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols + 1.2, 3.6 * rows), squeeze=False,
                             constrained_layout=True)
    drawn = 0
    for ax, path in zip(axes.flat, files):
        record = read_calibration_file(path)
        parts = Path(path).parts
        title = f"{parts[-3]} · {parts[-2]} · {record['variant']}" if len(parts) >= 3 else Path(path).name
        calibration = method_class(record["method"]).calibration()
        ax.grid(False)
        if calibration.figure(record["tensors"], ax, title):
            if getattr(calibration, "integer_axes", True):  # step and block axes (TeaCache's are continuous)
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            drawn += 1
        else:
            ax.set_axis_off()
    for ax in list(axes.flat)[n:]:
        ax.set_axis_off()
    fig.suptitle("What the calibrated methods learned (one panel per model · sampler · calibration)", fontsize=13)
    save_atomic(fig, out)


NO_TUNING = "no tuned runs: set `tuning:` in the config"
FRONT_COLUMNS = ["model", "sampler", "family", "label", "macs_speedup", "psnr_to_full", "front"]


def front_points(front: dict) -> pd.DataFrame:
    """Every tuned point of one front.json (one model and sampler), by family, with a finite speed-up and PSNR."""
    rows = [{"model": front["model"], "sampler": front["sampler"], "family": family, "label": p["label"],
             "macs_speedup": p["macs_speedup"], "psnr_to_full": p["psnr_to_full"], "front": bool(p.get("front"))}
            for family, entry in sorted(front.get("methods", {}).items()) for p in entry.get("points", [])]
    points = pd.DataFrame(rows, columns=FRONT_COLUMNS)
    finite = np.isfinite(points.macs_speedup.astype(float)) & np.isfinite(points.psnr_to_full.astype(float))
    return points[finite]


def family_colours(families) -> dict:
    """Family → colour, the same in every panel (sorted names): the colour-blind palette up to ten
    families, beyond that tab20's pairs, so that no two lines share a colour (markers differ too)."""
    names = sorted(set(families))
    palette = "colorblind" if len(names) <= 10 else "tab20"
    return dict(zip(names, sns.color_palette(palette, n_colors=max(1, len(names)))))


def family_marker(family: str, colours: dict) -> str:
    """A marker per family (in the colours' order), a second cue where colours are close."""
    return MARKERS[list(colours).index(family) % len(MARKERS)]


def tuning_title(fronts: list[dict]) -> str:
    """The figure's title: these are the tuning seeds' samples, not the evaluation's."""
    seeds = ", ".join(str(s) for s in sorted({f.get("seed") for f in fronts}, key=str))
    samples = ", ".join(str(n) for n in sorted({f.get("num_samples") for f in fronts}, key=str))
    return (f"tuning seed {seeds}, {samples} samples: every point of each search space; "
            f"lines: each method's non-dominated points")


def tuning_panel(ax, points: pd.DataFrame, colours: dict) -> None:
    """One model and sampler: each family's points faint, its front points joined by a solid line."""
    for family, part in points.groupby("family", sort=True):
        colour = colours[family]
        ax.scatter(part.macs_speedup, part.psnr_to_full, s=14, color=colour, alpha=0.25, lw=0, zorder=2)
        line = part[part.front].sort_values(["macs_speedup", "psnr_to_full"])
        ax.plot(line.macs_speedup, line.psnr_to_full, color=colour, marker=family_marker(family, colours), ms=5,
                lw=1.6, ls="-", zorder=3)
    log_axis(ax.xaxis, ax.set_xscale, points.macs_speedup, "×")
    ax.set_xlabel("speed-up in MACs per image (log scale)")
    ax.set_ylabel("PSNR to full on the tuning seed, dB")


def tuning_figure(front_files, out) -> pd.DataFrame:
    """The tuning stage's view, one panel per model and sampler, from each ``front.json``.

    x = MACs speed-up, y = PSNR to the uncached images, both on the tuning seeds: every point of
    every family's search space faint (what was tried), each family's non-dominated points joined
    by a solid line in its colour (what was then evaluated). Without front files the figure says
    so (the workflow may ask for it before any family is tuned). Returns the points drawn.
    """
    fronts = [json.loads(Path(path).read_text()) for path in front_files]
    points = pd.concat([front_points(f) for f in fronts]) if fronts else pd.DataFrame(columns=FRONT_COLUMNS)
    if points.empty:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.set_axis_off()
        ax.text(0.5, 0.5, NO_TUNING, ha="center", va="center", transform=ax.transAxes)
        save_atomic(fig, out)
        return points
    colours = family_colours(points.family)
    models, samplers = panels(points)
    fig, axes = plt.subplots(len(models), len(samplers), figsize=(5.6 * len(samplers) + 3, 4.4 * len(models)),
                             squeeze=False, constrained_layout=True)
    for r, model in enumerate(models):
        for c, sampler in enumerate(samplers):
            ax = axes[r, c]
            sub = points[(points.model == model) & (points.sampler == sampler)]
            if sub.empty:
                ax.set_axis_off()
                continue
            tuning_panel(ax, sub, colours)
            ax.set_title(f"{model} · {sampler}")
    handles = [Line2D([], [], color=colour, marker=family_marker(family, colours), ms=5, lw=1.6, label=family)
               for family, colour in colours.items()]
    handles.append(Line2D([], [], color="0.3", marker="o", ms=4, ls="none", alpha=0.25, label="every tuned point"))
    fig.legend(handles=handles, loc="outside right center", title="family", frameon=False)
    fig.suptitle(tuning_title(fronts), fontsize=13)
    save_atomic(fig, out)
    return points


def with_latency(table: pd.DataFrame, latency_csv) -> pd.DataFrame:
    """The main table with the measured ``speedup`` of each row from ``latency.csv`` (tables.py)."""
    latency = pd.read_csv(latency_csv).rename(columns={"method": "label"})[["model", "sampler", "label", "speedup"]]
    merged = table.drop(columns=["speedup"], errors="ignore").merge(latency, on=["model", "sampler", "label"],
                                                                    how="left")
    if merged.speedup.isna().any():
        missing = merged[merged.speedup.isna()].iloc[0]
        raise ValueError(f"{latency_csv}: no measured speed-up for {missing.model}/{missing.sampler}/{missing.label}: "
                         f"write the tables again (tables.py) before the plots")
    return merged


def main(table_csv, run_paths, calibrations, out: dict, latency_csv=None, banner: str = "", fronts=None) -> dict:
    """Every figure named in ``out`` (name → path); returns each speed/quality figure's points.

    ``pareto_latency`` needs ``latency_csv`` (the measured speed-ups, kept out of the main table);
    ``tuning`` draws the tuning stage's ``fronts`` (front.json files); ``banner`` becomes every
    figure's first title line."""
    global BANNER
    BANNER = banner
    sns.set_theme(context="notebook", style="whitegrid", font_scale=1.0)
    table, runs = load_points(table_csv, run_paths)
    if "pareto_latency" in out:
        if latency_csv is None:
            raise ValueError("the pareto_latency figure needs the latency table (tables/latency.csv)")
        table = with_latency(table, latency_csv)
    table["image_values"] = [image_values(runs[k]["model_config"]) for k in zip(table.model, table.sampler, table.label)]
    styles = method_styles(table)
    data = {}
    data["pareto_macs"] = speed_quality_figure(table, styles, "macs_speedup", "speed-up in MACs per image (log scale)",
                                               "Speed-up (MACs) vs FID — better is lower right", True,
                                               out["pareto_macs"])
    if "pareto_latency" in out:
        data["pareto_latency"] = speed_quality_figure(table, styles, "speedup", "measured latency speed-up (log scale)",
                                                      "Speed-up (measured latency) vs FID — better is lower right", True,
                                                      out["pareto_latency"])
    data["macs_vs_fid"] = speed_quality_figure(table, styles, "macs_g_per_image",
                                               "GMACs per generated image, CFG included (log scale)",
                                               "Compute vs FID — better is lower left", False, out["macs_vs_fid"])
    data["pareto_psnr"] = speed_quality_figure(
        table, styles, "macs_speedup", "speed-up in MACs per image (log scale)",
        "Speed-up (MACs) vs fidelity to the uncached images — better is upper right", True, out["pareto_psnr"],
        y="psnr_to_full", ylabel="PSNR to full, dB (higher is better)")
    token_fraction_figure(table, runs, styles, out["token_fraction"])
    if "calibration" in out:
        calibration_figure(list(calibrations), out["calibration"])
    if "tuning" in out:
        data["tuning"] = tuning_figure(list(fronts or []), out["tuning"])
    return data


if __name__ == "__main__" and "snakemake" in globals():
    sm = snakemake  # noqa: F821
    main(sm.input.table, [*sm.input.runs, *sm.input.get("tuned_runs", [])], sm.input.calibrations, {name: path for name, path in sm.output.items()},
         latency_csv=sm.input.latency, banner=sm.params.get("banner", ""), fronts=sm.input.get("fronts", []))
