"""Main table: one row per (model, sampler, method), in the layout of the caching papers."""
import json
from pathlib import Path

import pandas as pd

COLUMNS = ["model", "sampler", "method", "num_samples", "latency_s_per_image", "fid", "sfid",
           "inception_score", "precision", "recall", "class_consistency"]


def row(metrics_path: str, run_path: str) -> dict:
    parts = Path(metrics_path).parts
    model, sampler, method = parts[-4], parts[-3], parts[-2]
    metrics = json.loads(Path(metrics_path).read_text())
    run = json.loads(Path(run_path).read_text())
    out = {"model": model, "sampler": sampler, "method": method, "num_samples": run["num_samples"],
           "latency_s_per_image": run["seconds"] / run["num_samples"]}
    out.update({k: metrics.get(k) for k in COLUMNS if k in metrics})
    return out


def main(metrics, runs, csv, md, tex):
    table = pd.DataFrame([row(m, r) for m, r in zip(metrics, runs)])
    table = table[[c for c in COLUMNS if c in table.columns]].sort_values(["model", "sampler", "method"])
    table.to_csv(csv, index=False)
    Path(md).write_text(table.to_markdown(index=False, floatfmt=".4g") + "\n")
    Path(tex).write_text(table.to_latex(index=False, float_format="%.4g"))


if __name__ == "__main__" and "snakemake" in globals():
    main(snakemake.input.metrics, snakemake.input.runs, snakemake.output.csv,  # noqa: F821
         snakemake.output.md, snakemake.output.tex)  # noqa: F821
