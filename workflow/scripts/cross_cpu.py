"""How far a workflow's results move on another CPU: compare runs of the same config.

Another CPU is emulated on one machine by what differs between CPUs for torch: the vector ISA its
kernels dispatch to (``ATEN_CPU_CAPABILITY``), oneDNN's and MKL's (``ONEDNN_MAX_CPU_ISA``,
``MKL_ENABLE_INSTRUCTIONS``), and the thread count (how sums are split). Run the default workflow
once per setting into its own results folder, e.g.::

    workflow/scripts/stage_times.sh xcpu-base
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        workflow/scripts/stage_times.sh xcpu-avx2
    ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2 \\
        workflow/scripts/stage_times.sh xcpu-noavx
    workflow/scripts/stage_times.sh xcpu-threads2 threads=2   # (config keys, the same way)

then ``python workflow/scripts/cross_cpu.py results/xcpu-base results/xcpu-avx2 …`` prints, for
each folder against the first: the runs whose images differ (and by how much), the learned
routers/predictors' largest logit difference, and per metric of ``tables/main.csv`` the largest
absolute difference over all rows, also in units of that row's 95% interval half-width.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

METRICS = ["fid", "sfid", "inception_score", "precision", "recall", "kid", "class_consistency", "psnr_to_full",
           "ssim_to_full", "macs_speedup"]


def image_differences(base: Path, other: Path) -> dict:
    """Runs whose samples differ, images that differ, the largest pixel difference."""
    runs = images = total = 0
    worst = 0
    differing = []
    for path in sorted(base.glob("runs/*/*/*/samples.npz")):
        twin = other / path.relative_to(base)
        if not twin.is_file():
            continue
        with np.load(path) as a, np.load(twin) as b:
            x, y = a["arr_0"].astype(np.int16), b["arr_0"].astype(np.int16)
        diff = np.abs(x - y).reshape(len(x), -1).max(axis=1)
        total += len(x)
        if diff.any():
            runs += 1
            images += int((diff > 0).sum())
            worst = max(worst, int(diff.max()))
            differing.append(f"{'/'.join(path.parts[-4:-1])} ({int((diff > 0).sum())})")
    return {"runs_differing": runs, "images_differing": images, "images": total, "max_pixel_difference": worst,
            "which": differing}


def calibration_differences(base: Path, other: Path) -> float:
    """Largest absolute difference of the routers' and predictors' logits."""
    import torch

    worst = 0.0
    for path in sorted(list(base.glob("routers/*/*.pt")) + list(base.glob("predictors/*/*.pt"))):
        twin = other / path.relative_to(base)
        if twin.is_file():
            a, b = torch.load(path, weights_only=False), torch.load(twin, weights_only=False)
            worst = max(worst, float((a["logits"].double() - b["logits"].double()).abs().max()))
    return worst


def metric_differences(base: Path, other: Path) -> pd.DataFrame:
    """Per metric: rows that differ, largest |difference|, largest |difference| / interval half-width."""
    key = ["model", "sampler", "method"]
    a = pd.read_csv(base / "tables" / "main.csv").set_index(key)
    b = pd.read_csv(other / "tables" / "main.csv").set_index(key).reindex(a.index)
    rows = []
    for m in METRICS:
        if m not in a:
            continue
        diff = (b[m] - a[m]).abs()
        half = (a.get(f"{m}_hi", np.nan) - a.get(f"{m}_lo", np.nan)) / 2 if f"{m}_hi" in a else None
        ratio = (diff / half.replace(0, np.nan)).max() if half is not None else np.nan
        worst = diff.idxmax() if diff.notna().any() and diff.max() > 0 else None
        rows.append({"metric": m, "rows_differing": int((diff > 0).sum()), "rows": int(diff.notna().sum()),
                     "max_abs_difference": float(diff.max()) if diff.notna().any() else np.nan,
                     "max_in_interval_halfwidths": float(ratio) if ratio == ratio else np.nan,
                     "worst_row": "/".join(worst) if worst else "—"})
    return pd.DataFrame(rows)


def resolution_changes(base: Path, other: Path) -> str:
    """How many paired differences from full change their verdict (interval excludes 0 or not)."""
    key = ["model", "sampler", "method"]
    a = pd.read_csv(base / "tables" / "main.csv").set_index(key)
    b = pd.read_csv(other / "tables" / "main.csv").set_index(key).reindex(a.index)
    changed, total, worst = 0, 0, 0.0
    for col in [c for c in a if c.startswith("d_") and c.endswith("_lo")]:
        m = col[2:-3]
        for t in (a, b):
            t[f"_res_{m}"] = (t[col] > 0) | (t[f"d_{m}_hi"] < 0)
        valid = a[col].notna() & b[col].notna()
        changed += int((a.loc[valid, f"_res_{m}"] != b.loc[valid, f"_res_{m}"]).sum())
        total += int(valid.sum())
        worst = max(worst, float((a[col] - b[col]).abs().max()), float((a[f"d_{m}_hi"] - b[f"d_{m}_hi"]).abs().max()))
    return (f"paired differences from full: {changed} of {total} change their verdict (interval excludes 0 or "
            f"not); interval ends move by at most {worst:.3g}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="results folder of the reference setting")
    parser.add_argument("others", nargs="+", help="results folders of the same config under other settings")
    args = parser.parse_args(argv)
    base = Path(args.base)
    for other in map(Path, args.others):
        images = image_differences(base, other)
        print(f"## {other.name} against {base.name}\n")
        print(f"- images: {images['images_differing']} of {images['images']} differ, in {images['runs_differing']} "
              f"runs, by at most {images['max_pixel_difference']} of 255"
              + (f" ({', '.join(images['which'][:8])}{' …' if len(images['which']) > 8 else ''})" if images["which"]
                 else ""))
        print(f"- routers and predictors: largest logit difference {calibration_differences(base, other):.3g}\n")
        print(metric_differences(base, other).to_markdown(index=False, floatfmt=".3g"))
        print(f"\n- {resolution_changes(base, other)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
