"""Sweep TokenCache's schedule and strength on a finished testbed run, to choose its defaults.

Uses what the default workflow made (backbone, Cache Predictor, evaluator, reference batch, the
``full`` run as fidelity reference) and runs each setting in this process: sample → MACs → FID
and PSNR to ``full``. Writes ``<results>/tables/tokencache_sweep.{csv,md}``. Example::

    python workflow/scripts/tokencache_sweep.py --results results/digits --model DiT-digits --sampler ddim20
"""
import argparse
import json
import tempfile
from pathlib import Path

import pandas as pd
import torch

#: (label, parameters) swept: TPRR intervals at the default strength, then strengths.
SETTINGS = [
    ("K1=2,K2=2", dict(k1=2, k2=2)),
    ("K1=3,K2=2", dict(k1=3, k2=2)),
    ("K1=3,K2=1", dict(k1=3, k2=1)),
    ("K1=4,K2=2", dict(k1=4, k2=2)),
    ("K1=4,K2=3", dict(k1=4, k2=3)),
    ("K1=6,K2=3", dict(k1=6, k2=3)),
    ("rho=0.5,beta=1", dict(cache_ratio=0.5, block_ratio=1.0)),
    ("rho=0.75,beta=1", dict(cache_ratio=0.75, block_ratio=1.0)),
    ("rho=0.9,beta=0.5", dict(cache_ratio=0.9, block_ratio=0.5)),
    ("rho=1,beta=0.5", dict(cache_ratio=1.0, block_ratio=0.5)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results/digits", help="results folder of a finished workflow run")
    parser.add_argument("--model", default="DiT-digits")
    parser.add_argument("--sampler", default="ddim20")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from tokencache.metrics.flops import run_macs
    from tokencache.metrics.quality import evaluate_run
    from tokencache.run import SampleRequest, run_sampling

    root = Path(args.results)
    full_dir = root / "runs" / args.model / args.sampler / "full"
    full_run = json.loads((full_dir / "run.json").read_text())
    full_request, num_samples = full_run["request"], full_run["num_samples"]
    full_metrics = json.loads((full_dir / "metrics.json").read_text())  # the evaluator and reference it used
    predictor = root / "predictors" / args.model / f"{args.sampler}.pt"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, params in SETTINGS:
            out = str(Path(tmp) / "samples.npz")
            request = SampleRequest(checkpoint=full_request["checkpoint"], out=out,
                                    sampler=args.sampler, cfg_scale=full_request["cfg_scale"],
                                    scale_pow=full_request["scale_pow"], num_samples=num_samples,
                                    batch_size=num_samples, seed=full_request["seed"],
                                    device="cpu", clip_denoised=full_request["clip_denoised"], method="tokencache",
                                    method_params={"predictor": str(predictor), **params})
            summary = run_sampling(request, progress=False)
            macs = run_macs(summary)
            metrics = evaluate_run(out, full_metrics["reference"], features="digits",
                                   weights_path=full_metrics["extractor"]["weights"],
                                   fidelity_to=full_dir / "samples.npz")
            rows.append({"setting": label, "macs_speedup": macs["macs_speedup"], "fid": metrics["fid"],
                         "sfid": metrics["sfid"], "psnr_to_full": metrics["psnr_to_full"],
                         "class_consistency": metrics.get("class_consistency")})
            print(json.dumps(rows[-1]), flush=True)
    table = pd.DataFrame(rows)
    out_dir = root / "tables"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"tokencache_sweep_{args.model}_{args.sampler}"
    from tokencache.io import write_atomic

    write_atomic(f"{stem}.csv", table.to_csv(index=False))
    write_atomic(f"{stem}.md", table.to_markdown(index=False, floatfmt=".4g") + "\n")


if __name__ == "__main__":
    main()
