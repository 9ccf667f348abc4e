"""GPU hours of a paper-scale comparison by fronts, both ways: FID-50K at every point of every
search space, or the tuning stage (every point on a few tuning samples) and FID-50K at the
points it selects. An estimate, and printed as one.

Per image, a point costs the uncached image's MACs divided by its MACs speed-up. The speed-ups
and the share of each method's points that get evaluated come from a finished tuning stage of
the testbed (``--front``: its front.json; the schedules are the same, the depth and the
weights are not, so they are proxies). An uncached image's GPU seconds come from its MACs (the
preset's forward, CFG rows, the sampler's steps) at ``--tflops`` sustained; give
``--seconds-per-image`` instead once a GPU has measured it (results/gpu). Inception features and
the metrics are left out (minutes per 50,000 images, the same in both ways).

    python workflow/scripts/tuning_cost.py --config config/paper.yaml \\
        --front results/digits/tuning/DiT-digits/ddim20/front.json
"""
import argparse
import json

import yaml

FLOP_PER_MAC = 2
EVALUATION_SAMPLES = 50_000


def uncached_image_seconds(preset: str, steps: int, rows: int, tflops: float) -> float:
    """Seconds of one uncached image: steps × CFG rows × the forward's MACs × 2 FLOP, at ``tflops``."""
    from tokencache.metrics.flops import analytic_forward_macs, build_for_counting

    macs = analytic_forward_macs(build_for_counting(preset, device="meta"))
    return steps * rows * macs * FLOP_PER_MAC / (tflops * 1e12)


def family_costs(front: dict) -> dict:
    """Per family: (Σ 1/speed-up over every point, Σ 1/speed-up over the evaluated points)."""
    out = {}
    for family, record in front["methods"].items():
        every = sum(1 / p["macs_speedup"] for p in record["points"])
        evaluated = sum(1 / p["macs_speedup"] for p in record["points"] if p["evaluate"])
        out[family] = (every, evaluated)
    return out


def estimate(config: dict, front: dict, tflops: float, seconds_per_image=None) -> list[dict]:
    """One row per (backbone, tuned sampler): images and GPU hours of both ways."""
    from tokencache.sampling import parse_sampler

    tuning = config["tuning"]
    costs = family_costs(front)
    missing = sorted(set(tuning["methods"]) - set(costs))
    if missing:
        raise SystemExit(f"--front has no tuning of {', '.join(missing)}: give a front file of the same families")
    rows = []
    for preset, backbone in config["backbones"].items():
        for sampler in tuning.get("samplers", config["samplers"]):
            cfg = backbone.get("cfg_scale", config["samplers"][sampler]["cfg_scale"])
            per_image = seconds_per_image or uncached_image_seconds(preset, parse_sampler(sampler).steps,
                                                                    2 if cfg > 1 else 1, tflops)
            every = sum(costs[f][0] for f in tuning["methods"])
            evaluated = sum(costs[f][1] for f in tuning["methods"])
            tune = tuning["num_samples"] * (every + 1)  # every point, and the uncached reference
            rows.append({
                "backbone": preset, "sampler": sampler, "uncached_s_per_image": per_image,
                "grid_gpu_h": EVALUATION_SAMPLES * every * per_image / 3600,
                "tuning_gpu_h": tune * per_image / 3600,
                "selected_fid50k_gpu_h": EVALUATION_SAMPLES * evaluated * per_image / 3600,
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/paper.yaml", help="a config with a tuning: section")
    parser.add_argument("--front", required=True, help="a finished tuning stage's front.json (the testbed's)")
    parser.add_argument("--tflops", type=float, default=300.0,
                        help="sustained bfloat16 TFLOP/s of the GPU (an assumption; default 300 for an H200)")
    parser.add_argument("--seconds-per-image", type=float, default=None,
                        help="measured GPU seconds of one uncached image (replaces --tflops)")
    args = parser.parse_args()
    with open(args.config) as f:
        config = yaml.safe_load(f)
    with open(args.front) as f:
        front = json.load(f)
    rows = estimate(config, front, args.tflops, args.seconds_per_image)
    basis = (f"{args.seconds_per_image} s per uncached image (measured)" if args.seconds_per_image
             else f"an assumed {args.tflops:g} TFLOP/s sustained")
    print(f"ESTIMATE ({basis}; speed-ups and evaluated shares from {args.front})")
    print("| backbone | sampler | uncached s/image | FID-50K at every point | tuning | FID-50K at selected points "
          "| tuning + selected |")
    print("|:--|:--|--:|--:|--:|--:|--:|")
    for r in rows:
        both = r["tuning_gpu_h"] + r["selected_fid50k_gpu_h"]
        print(f"| {r['backbone']} | {r['sampler']} | {r['uncached_s_per_image']:.3f} | {r['grid_gpu_h']:,.0f} GPU-h "
              f"| {r['tuning_gpu_h']:,.1f} GPU-h | {r['selected_fid50k_gpu_h']:,.0f} GPU-h | {both:,.0f} GPU-h |")


if __name__ == "__main__":
    main()
