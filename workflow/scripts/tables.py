"""Main table: one row per (model, sampler, method), in the layout of the caching papers."""
import json
from pathlib import Path

import pandas as pd

COLUMNS = ["model", "sampler", "method", "setting", "macs_g_per_image", "macs_speedup", "latency_s_per_image",
           "speedup", "fid", "sfid", "inception_score", "precision", "recall", "class_consistency", "psnr_to_full",
           "ssim_to_full", "num_samples"]


def row(metrics_path: str, run_path: str) -> dict:
    parts = Path(metrics_path).parts
    model, sampler, method = parts[-4], parts[-3], parts[-2]
    metrics = json.loads(Path(metrics_path).read_text())
    run = json.loads(Path(run_path).read_text())
    from tokencache.metrics.flops import run_macs

    macs = run_macs(run)
    setting = ", ".join(f"{k}={v}" for k, v in run["cache"]["params"].items() if v is not None and k != "router")
    out = {"model": model, "sampler": sampler, "method": method, "setting": setting or "—",
           "num_samples": run["num_samples"], "latency_s_per_image": run["seconds"] / run["num_samples"],
           "macs_g_per_image": macs["macs_per_image"] / 1e9, "macs_speedup": macs["macs_speedup"]}
    out.update({k: metrics.get(k) for k in COLUMNS if k in metrics})
    return out


def main(metrics, runs, csv, md, tex):
    table = pd.DataFrame([row(m, r) for m, r in zip(metrics, runs)])
    full = table[table.method == "full"].set_index(["model", "sampler"])["latency_s_per_image"]
    table["speedup"] = [full[(m, s)] / lat for m, s, lat in zip(table.model, table.sampler, table.latency_s_per_image)]
    table = table[[c for c in COLUMNS if c in table.columns]].sort_values(["model", "sampler", "macs_g_per_image"],
                                                                         ascending=[True, True, False])
    table.to_csv(csv, index=False)
    Path(md).write_text(table.to_markdown(index=False, floatfmt=".4g") + "\n")
    Path(tex).write_text(table.to_latex(index=False, float_format="%.4g"))


if __name__ == "__main__" and "snakemake" in globals():
    main(snakemake.input.metrics, snakemake.input.runs, snakemake.output.csv,  # noqa: F821
         snakemake.output.md, snakemake.output.tex)  # noqa: F821
