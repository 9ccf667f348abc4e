"""Sweep one method's settings on a finished testbed run, to choose its defaults.

Uses what the default workflow made (backbone, the method's calibration file, evaluator, reference
batch, the reference run's images for fidelity) and runs each setting in this process: sample →
MACs → FID and PSNR to the reference. ``--method`` is the base (``NAME:key=value,…``; a
calibration file parameter ``auto`` means the workflow's file for this model and sampler), each
``--vary`` one setting on top of it. Writes ``<results>/tables/sweep_<NAME>_<model>_<sampler>.{csv,md}``.
The TokenCache defaults (docs/methods.md) came from::

    python workflow/scripts/sweep.py --results results/digits --model DiT-digits --sampler ddim20 \\
        --method tokencache:predictor=auto --vary k1=2,k2=2 k1=3,k2=2 k1=3,k2=1 k1=4,k2=2 k1=4,k2=3 \\
        k1=6,k2=3 cache_ratio=0.5,block_ratio=1 cache_ratio=0.75,block_ratio=1 \\
        cache_ratio=0.9,block_ratio=0.5 cache_ratio=1,block_ratio=0.5
"""
import argparse
import json
import tempfile
from pathlib import Path

import pandas as pd
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results/digits", help="results folder of a finished workflow run")
    parser.add_argument("--model", default="DiT-digits")
    parser.add_argument("--sampler", default="ddim20")
    parser.add_argument("--method", required=True, metavar="NAME[:KEY=VALUE,…]", help="the base setting")
    parser.add_argument("--vary", nargs="+", required=True, metavar="KEY=VALUE[,…]", help="settings on top of it")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from tokencache.cache import get_method, method_class, parse_method_spec, reference_method
    from tokencache.io import write_atomic
    from tokencache.metrics.flops import run_macs
    from tokencache.metrics.quality import evaluate_run
    from tokencache.results import resolve_portable
    from tokencache.run import SampleRequest, run_sampling

    root = Path(args.results)
    name, base = parse_method_spec(args.method)
    calibration = method_class(name).calibration
    if calibration is not None and base.get(calibration.file_param) == "auto":
        variant = get_method(name, **{k: v for k, v in base.items() if k != calibration.file_param}).calibration_id()
        base[calibration.file_param] = str(root / "calibration" / args.model / args.sampler / f"{variant}.pt")
    reference_dir = root / "runs" / args.model / args.sampler / reference_method()
    reference = json.loads((reference_dir / "run.json").read_text())
    request, num_samples = reference["request"], reference["num_samples"]
    # the evaluator and reference it used (paths in results files are portable: shipped:NAME or relative to root)
    evaluated = json.loads((reference_dir / "metrics.json").read_text())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for vary in args.vary:
            params = {**base, **parse_method_spec(f"{name}:{vary}")[1]}
            out = str(Path(tmp) / "samples.npz")
            summary = run_sampling(SampleRequest(
                checkpoint=resolve_portable(request["checkpoint"], root), out=out, sampler=args.sampler, cfg_scale=request["cfg_scale"],
                scale_pow=request["scale_pow"], num_samples=num_samples, batch_size=num_samples,
                seed=request["seed"], device="cpu", clip_denoised=request["clip_denoised"], method=name,
                method_params=params), progress=False)
            macs = run_macs(summary)
            metrics = evaluate_run(out, resolve_portable(evaluated["reference"], root), features="digits",
                                   weights_path=resolve_portable(evaluated["extractor"]["weights"], root),
                                   fidelity_to=reference_dir / "samples.npz")
            rows.append({"setting": vary, "macs_speedup": macs["macs_speedup"], "fid": metrics["fid"],
                         "sfid": metrics["sfid"], "psnr_to_full": metrics["psnr_to_full"],
                         "class_consistency": metrics.get("class_consistency")})
            print(json.dumps(rows[-1]), flush=True)
    table = pd.DataFrame(rows)
    stem = root / "tables" / f"sweep_{name}_{args.model}_{args.sampler}"
    write_atomic(f"{stem}.csv", table.to_csv(index=False))
    write_atomic(f"{stem}.md", table.to_markdown(index=False, floatfmt=".4g") + "\n")


if __name__ == "__main__":
    main()
