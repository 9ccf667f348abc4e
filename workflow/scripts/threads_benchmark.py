"""How fast ``tokencache sample`` runs at one thread, at every core and at its default, with 0, 1 or
2 other processes busy on the machine: the measurement behind ``--threads``' default.

Each case is the command a user types (a fresh process: start-up included), timed end to end;
the busy processes are pure-Python spin loops, one core each, started before and killed after
each group of cases. Models: the shipped DiT-digits (hidden 64), and wider random-weight
variants of it (``--hidden``) to find the model size from which more threads pay off.

    python workflow/scripts/threads_benchmark.py --out results/threads/threads.json
    python workflow/scripts/threads_benchmark.py --hidden 64 256 --busy 0 1 2 --repeats 3 --out …

Writes a JSON with every timing and prints a Markdown table (median seconds; ratio to one thread).
Run it on an otherwise idle machine: another job changes every number.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPIN = "while True: pass"


def tokencache_command() -> list[str]:
    exe = Path(sys.executable).parent / "tokencache"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "tokencache"]


def random_checkpoint(hidden: int, folder: Path) -> str:
    """A DiT-digits with ``hidden`` channels and random weights (timing needs no trained model)."""
    import torch

    from tokencache.models import create_model

    torch.manual_seed(0)
    model = create_model("DiT-digits", hidden_size=hidden)
    path = folder / f"dit-digits-h{hidden}.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def sample_seconds(checkpoint: str, hidden: int, images: int, threads: int | None, out: Path) -> float:
    cmd = tokencache_command() + ["sample", "--checkpoint", checkpoint, "--sampler", "ddim20", "--cfg-scale", "3",
                                  "--num-samples", str(images), "--batch-size", str(images), "--quiet",
                                  "--out", str(out)]
    if hidden != 64:
        cmd += ["--model", "DiT-digits", "--model-set", f"hidden_size={hidden}"]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 256], help="model widths (64: the shipped model)")
    parser.add_argument("--images", type=int, nargs="+", default=None,
                        help="images per case, one per width (default: 64 at width 64, fewer when wider)")
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2], help="numbers of busy processes")
    parser.add_argument("--threads", nargs="+", default=["1", "2", "default"], help="thread settings to time")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", required=True, help="JSON with every timing")
    args = parser.parse_args(argv)
    images = args.images or [max(8, 64 * 64 // h) for h in args.hidden]
    if len(images) != len(args.hidden):
        parser.error("--images needs one count per --hidden width")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoints = {h: "shipped:DiT-digits" if h == 64 else random_checkpoint(h, tmp) for h in args.hidden}
        for busy in args.busy:
            spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(busy)]
            try:
                time.sleep(1.0)
                for hidden, count in zip(args.hidden, images):
                    for setting in args.threads:
                        threads = None if setting == "default" else int(setting)
                        times = [sample_seconds(checkpoints[hidden], hidden, count, threads, tmp / "s.npz")
                                 for _ in range(args.repeats)]
                        rows.append({"busy": busy, "hidden": hidden, "images": count, "threads": setting,
                                     "seconds": times, "median_s": round(statistics.median(times), 2)})
                        print(f"busy {busy} hidden {hidden} threads {setting}: {rows[-1]['median_s']} s", file=sys.stderr)
            finally:
                for p in spinners:
                    p.kill()
                    p.wait()
    from tokencache.io import write_atomic
    from tokencache.provenance import provenance

    result = {"rows": rows, "provenance": provenance("cpu")}
    write_atomic(args.out, result)
    print("| busy processes | hidden | images | " + " | ".join(f"threads {t}" for t in args.threads) + " |")
    print("|--:|--:|--:|" + "--:|" * len(args.threads))
    for busy in args.busy:
        for hidden in args.hidden:
            cells = {r["threads"]: r for r in rows if r["busy"] == busy and r["hidden"] == hidden}
            one = cells.get("1", {}).get("median_s")
            text = [f"{c['median_s']} s" + (f" ({c['median_s'] / one:.2f}×)" if one and t != "1" else "")
                    for t, c in cells.items()]
            print(f"| {busy} | {hidden} | {next(iter(cells.values()))['images']} | " + " | ".join(text) + " |")
    return result


if __name__ == "__main__":
    main()
