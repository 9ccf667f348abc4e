"""MACs per image of a method's schedule at a paper model's shape, without its weights.

The engine's counts (which step and block computed how many tokens of each branch) of a fixed-
schedule method depend on the model's depth and token count, not on its width or weights: this
runs one sample through a random stand-in with the preset's depth, token grid and class count but
a small hidden size, and prices the counts at the preset's real sizes (fvcore, CFG included), as
`tokencache flops --run` does for a real run. Methods whose decisions depend on the weights (a
trained router or predictor, a runtime signal) get the stand-in's decisions, which are not the
real model's: use it for schedules, not for those.

    python workflow/scripts/schedule_macs.py --model DiT-XL/2 --sampler ddim50 --method toca \\
        --method fora:interval=3
"""
import argparse
import json

import torch

from tokencache.cache import attach, get_method
from tokencache.cache.registry import parse_method_spec
from tokencache.metrics.flops import build_for_counting, model_shape, sampling_macs
from tokencache.models import create_model
from tokencache.sampling import draw_labels, generate, sample_generators


def stand_in(preset: str, width: int = 64, heads: int = 4) -> torch.nn.Module:
    """The preset's depth and token grid at a small width, random weights of a visible scale."""
    real = build_for_counting(preset, device="meta")
    cfg = real.config
    torch.manual_seed(0)
    model = create_model(cfg["name"], **{**{k: v for k, v in cfg.items() if k not in ("name", "family")},
                                         "hidden_size": width, "num_heads": heads}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="DiT-XL/2", help="preset whose shape prices the counts")
    parser.add_argument("--sampler", default="ddim50")
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--method", action="append", required=True, metavar="NAME[:KEY=VALUE,…]")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = stand_in(args.model)
    shape = model_shape(build_for_counting(args.model, device="meta"))
    out = {}
    for spec in args.method:
        name, params = parse_method_spec(spec)
        with attach(model, get_method(name, **params), args.sampler) as engine:
            gens = sample_generators(0, [0])
            with torch.no_grad():
                generate(model, engine.sampler, draw_labels(gens, model.num_classes), gens, cfg_scale=args.cfg_scale,
                         step_listener=engine.step_listener)
        summary = engine.summary(counts=True)
        macs = sampling_macs(shape, summary, cfg=args.cfg_scale > 1)
        counts = torch.tensor(summary["counts"])  # (steps, blocks, branches): tokens computed
        tokens = counts.max()
        all_full = [k for k in range(counts.shape[0]) if (counts[k] == tokens).all()]
        block0_only = [k for k in range(counts.shape[0]) if (counts[k, 0] == tokens).all() and k not in all_full]
        out[spec] = {"gmacs_per_image": round(macs["macs_per_image"] / 1e9, 1),
                     "gmacs_with_overhead": round((macs["macs_per_image"] + macs["overhead_macs_per_image"]) / 1e9, 1),
                     "macs_speedup": round(macs["macs_speedup"], 3), "token_fraction": summary["token_fraction"],
                     "full_steps": len(all_full), "steps_full_in_block_0_only": block0_only}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
