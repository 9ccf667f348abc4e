"""What the bootstrap intervals cost per evaluated run, by number of resamples.

    python workflow/scripts/bootstrap_cost.py results/digits/runs/DiT-digits/ddim20/fora3/samples.npz \\
        --fidelity-to results/digits/runs/DiT-digits/ddim20/full/samples.npz

evaluates one sample file with the shipped digits evaluator at 0, 200, 500 and 1000 resamples on
one thread and prints the CPU-seconds of the whole evaluation and of the bootstrap alone (best of
``--repeats``), and how much the interval endpoints move between resample counts.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samples")
    parser.add_argument("--fidelity-to", default=None)
    parser.add_argument("--resamples", type=int, nargs="+", default=[0, 200, 500, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)  # as the workflow's evaluations

    from tokencache.metrics.quality import evaluate_run
    from tokencache.weights import shipped_path

    evaluate_run(args.samples, shipped_path("digits-reference"), features="digits",  # warm-up: imports, caches
                 weights_path=shipped_path("digits-evaluator"), fidelity_to=args.fidelity_to, bootstrap=0)
    results = {}
    for b in args.resamples:
        best = best_boot = float("inf")
        for _ in range(args.repeats):
            start = time.process_time()
            result = evaluate_run(args.samples, shipped_path("digits-reference"), features="digits",
                                  weights_path=shipped_path("digits-evaluator"), fidelity_to=args.fidelity_to,
                                  bootstrap=b)
            best = min(best, time.process_time() - start)
            best_boot = min(best_boot, (result.get("bootstrap") or {}).get("seconds", 0.0))
        results[b] = result
        print(f"{b:5d} resamples: evaluation {best:.2f} CPU-s, of which bootstrap {best_boot:.2f} s")
    largest = max(args.resamples)
    for b in args.resamples:
        if b and b != largest:
            moves = [abs(np.array(results[b]["ci95"][m]) - np.array(results[largest]["ci95"][m])).max() /
                     max(1e-12, (results[largest]["ci95"][m][1] - results[largest]["ci95"][m][0]) / 2)
                     for m in results[largest]["ci95"] if results[largest]["ci95"][m] and results[b]["ci95"].get(m)]
            print(f"{b:5d} vs {largest} resamples: interval ends differ by at most {max(moves):.0%} of the half-width")


if __name__ == "__main__":
    main()
