"""What the trained calibration artefacts (L2C's router, TokenCache's predictor) share.

Both are tables of logits learned against one frozen model on one sampler, from that model's
own sampling trajectories: :func:`record_trajectories` makes the trajectories, and
:func:`save_tied` / :func:`load_tied` write and read a file that records the model (its
configuration and a checksum of its weights) and the sampler, so that using it with another
model or sampler is a clear error rather than silently wrong caching.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional, Union

import torch

from tokencache.sampling import Sampler, draw_labels, generate, parse_sampler, sample_generators


def model_fingerprint(model: torch.nn.Module) -> dict:
    """The model's configuration (without its preset name) and a float64 sum of its parameters."""
    config = {k: v for k, v in dict(getattr(model, "config", {})).items() if k != "name"}
    if not config:
        config = {"family": type(model).__name__, "block_count": int(model.block_count),
                  "num_tokens": int(model.num_tokens)}
    with torch.no_grad():
        checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    return {"config": config, "param_sum": checksum}


def save_tied(path: Union[str, Path], fmt: str, logits: torch.Tensor, model: torch.nn.Module, sampler: Sampler,
              training: Optional[dict]) -> None:
    """Write ``{format, logits, sampler, model fingerprint, training}`` atomically (``.part`` + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {"format": fmt, "logits": logits.detach().float().cpu(), "sampler": sampler.name,
           "model": model_fingerprint(model), "training": dict(training or {})}
    tmp = path.with_name(f".{path.name}.part")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_tied(path: Union[str, Path], fmt: str, error: type, kind: str, title: str, command: str,
              model: Optional[torch.nn.Module] = None, sampler: Union[Sampler, str, None] = None) -> dict:
    """Read a file of format ``fmt``; with ``model``/``sampler``, check it was trained for them.

    Every problem is an ``error`` (a ValueError subclass) in one line that names the file as a
    ``kind`` ("router"), its ``title`` ("L2C router") and the ``command`` that makes one.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{kind} file {path} does not exist (train one with `{command}`)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise error(f"{kind} file {path} cannot be read: {type(exc).__name__}") from exc
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise error(f"{path} is not a tokencache {title} (format {fmt})")
    if sampler is not None:
        name = sampler if isinstance(sampler, str) else sampler.name
        if parse_sampler(name).name != obj["sampler"]:
            raise error(f"{kind} {path} was trained for sampler {obj['sampler']}, this run uses {name}")
    if model is not None:
        want, have = obj["model"], model_fingerprint(model)
        if want["config"] != have["config"]:
            raise error(f"{kind} {path} was trained for model {json.dumps(want['config'], sort_keys=True)}, "
                        f"not {json.dumps(have['config'], sort_keys=True)}")
        if not math.isclose(want["param_sum"], have["param_sum"], rel_tol=1e-6, abs_tol=1e-6):
            raise error(f"{kind} {path} was trained for other weights of this architecture "
                        f"(parameter checksum {want['param_sum']:.6g} vs {have['param_sum']:.6g})")
    return obj


def record_trajectories(model, sampler: Sampler, cfg_scale: float, scale_pow, seed: int, num_samples: int,
                         batch_size: int, clip_denoised: bool, progress: bool):
    """The model's inputs at every step of full sampling of calibration samples ``(seed, 0…M−1)``.

    Returns (x, t, y): x[k] (M, c, C, H, W) and y (M, c) with c = rows per sample (2 with CFG
    batching: conditional, null), t[k] the original timestep of step k.
    """
    from tqdm import tqdm

    steps_x: list[list[torch.Tensor]] = [[] for _ in range(sampler.steps)]
    steps_t: list[torch.Tensor] = [None] * sampler.steps
    labels_rows: list[torch.Tensor] = []
    state = {"step": 0}
    original_forward = model.forward

    def recording_forward(x, t, y, *args, **kwargs):
        copies = x.shape[0] // state["batch"]
        steps_x[state["step"]].append(x.detach().reshape(copies, state["batch"], *x.shape[1:]).transpose(0, 1))
        steps_t[state["step"]] = t[0].detach()
        if state["step"] == 0:
            labels_rows.append(y.detach().reshape(copies, state["batch"]).transpose(0, 1))
        return original_forward(x, t, y, *args, **kwargs)

    def listener(step, num_steps):
        state["step"] = step

    bar = tqdm(total=num_samples, desc="calibration trajectories", unit="img", disable=not progress)
    own_forward = model.__dict__.get("forward")
    model.forward = recording_forward
    try:
        for lo in range(0, num_samples, batch_size):
            indices = list(range(lo, min(lo + batch_size, num_samples)))
            gens = sample_generators(seed, indices)
            state["batch"] = len(indices)
            generate(model, sampler, draw_labels(gens, model.num_classes), gens, cfg_scale=cfg_scale,
                     scale_pow=scale_pow, step_listener=listener, clip_denoised=clip_denoised)
            bar.update(len(indices))
    finally:
        if own_forward is None:
            del model.forward
        else:
            model.forward = own_forward
        bar.close()
    return [torch.cat(chunks) for chunks in steps_x], steps_t, torch.cat(labels_rows)


def batch_rows(per_sample: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(M, c, ...) → the batch (c·b, ...) of samples ``index``, copies stacked as the model saw them."""
    picked = per_sample[index].transpose(0, 1)
    return picked.reshape(-1, *picked.shape[2:])
