"""Learning-to-Cache's router (Ma et al., arXiv 2406.01733): which branches a step may reuse.

The router holds one logit per (step, block, branch) — ``logits[i, block, branch]`` with ``i``
the respaced step index as in the official code (i = T−1 is the first, noisiest step; sampling
step k has i = T−1−k) and branch 0 = attention, 1 = MLP. Steps with odd i run in full; a step
with even i (and i < T−1, so that a previous step exists) reuses branch (block, b) when
σ(logits[i, block, b]) ≤ θ.

Training (:func:`train_router`) mirrors horseee/learning-to-cache ``DiT/train_router.py`` and
``router_training_losses``: pick a routed index i = 2u (u uniform in [0, T//2)); run the full
model at i+1 to fill the cache; the target is the full model's output at i on the state the
full step produced; the relaxed model at i blends every branch as
``stored·(1 − σ(w)) + fresh·σ(w)``; loss = mean-squared error over all output channels +
λ·Σσ(w_i); AdamW (weight decay 0), logits initialised N(0, 1) and clamped to [−5, 5] after each
update; the backbone is frozen. Two choices differ from the official script, which noises
ImageNet images with q_sample and drops 10% of labels: here the states come from the full
model's own trajectories (no dataset needed; calibration samples drawn from ``seed``, which
must differ from the evaluation seed), and each batch is the one the model sees at inference
(with CFG: conditional and null-label rows).

A router file (``torch.save`` dict, format ``tokencache-l2c-router/1``) records the logits,
the model configuration and a parameter checksum, the sampler and the training settings;
loading it for another model or sampler is a :class:`RouterError`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Union

import torch

from tokencache.cache.actions import COMPUTE, Blend
from tokencache.cache.calibration import batch_rows, load_tied, record_trajectories, save_tied
from tokencache.cache.engine import CacheEngine
from tokencache.cache.methods import CacheMethod
from tokencache.sampling import Sampler, parse_sampler

FORMAT = "tokencache-l2c-router/1"


class RouterError(ValueError):
    """A router file that is missing, malformed, or made for another model or sampler."""


def routed_indices(num_steps: int) -> list[int]:
    """Respaced indices whose step may reuse: even i below T−1 (odd i are full steps)."""
    return list(range(0, num_steps - 1, 2))


def save_router(path: Union[str, Path], logits: torch.Tensor, model: torch.nn.Module, sampler: Union[Sampler, str],
                training: Optional[dict] = None) -> None:
    """Write a router file atomically (see the module docstring for its content)."""
    sampler = parse_sampler(sampler) if isinstance(sampler, str) else sampler
    if tuple(logits.shape) != (sampler.steps, int(model.block_count), 2):
        raise RouterError(f"router logits {tuple(logits.shape)} do not match {sampler.steps} steps × "
                          f"{model.block_count} blocks × 2 branches")
    save_tied(path, FORMAT, logits, model, sampler, training)


def load_router(path: Union[str, Path], model: Optional[torch.nn.Module] = None,
                sampler: Union[Sampler, str, None] = None) -> dict:
    """Read a router file; with ``model``/``sampler`` check it was trained for them."""
    return load_tied(path, FORMAT, RouterError, "router", "L2C router", "tokencache train-router", model, sampler)


class _Relaxation(CacheMethod):
    """Training-time L2C: full at step ``full_step``, σ(w)-blend of every branch at the next step."""

    name = "l2c-training"

    def __init__(self, logits: torch.nn.Parameter):
        self.logits = logits
        self.routed_step = -1
        self.weights = None

    def params(self) -> dict:
        return {}

    def begin_step(self, step: int) -> None:
        if step == self.routed_step:
            self.weights = torch.sigmoid(self.logits[self.info.num_steps - 1 - step])

    def branch_action(self, step: int, block: int, branch: str):
        if step == self.routed_step:
            return Blend(self.weights[block, 0 if branch == "attn" else 1])
        return COMPUTE


def train_router(model: torch.nn.Module, sampler: Union[Sampler, str], *, cfg_scale: float = 1.5,
                 scale_pow: Optional[float] = None, steps: int = 300, batch_size: int = 16, num_samples: int = 64,
                 lr: float = 1e-3, l1: float = 1e-6, seed: int = 1, clip_denoised: bool = False,
                 out: Union[str, Path, None] = None, progress: bool = False, log=None) -> dict:
    """Train an L2C router for ``model`` (frozen) and ``sampler``; write it to ``out`` if given.

    :param cfg_scale, scale_pow, clip_denoised: as in sampling; the calibration trajectories
        and batches are the ones a run with these settings produces.
    :param steps: optimiser updates; ``batch_size`` samples per update (and per trajectory
        batch), drawn from ``num_samples`` calibration samples with seeds ``(seed, i)``.
        Use a seed that no evaluation run uses (sampling defaults to seed 0).
    :param lr: AdamW learning rate (official 1e-3); ``l1``: λ of the λ·Σσ(w) term (official
        DiT-XL/2 DDIM-50: 1e-6).
    :param log: optional text file; one JSON line per update (step, index, loss, mse, l1).
    :return: summary dict (router path, seconds, final losses, modules reused at θ = 0.1).
    """
    from tqdm import tqdm

    sampler = parse_sampler(sampler) if isinstance(sampler, str) else sampler
    if steps < 1 or batch_size < 1 or num_samples < 1 or lr <= 0 or l1 < 0:
        raise ValueError("train_router: steps, batch_size, num_samples must be ≥ 1, lr > 0 and l1 ≥ 0")
    if sampler.steps < 2:
        raise ValueError(f"train_router: {sampler.name} has no step that could reuse a previous one")
    if getattr(model, "cache_context", None) is not None:
        raise RuntimeError("train_router: detach the model's cache context first")
    start = time.perf_counter()
    device = next(model.parameters()).device
    frozen = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    num_steps, blocks = sampler.steps, int(model.block_count)
    logits = torch.nn.Parameter(torch.randn(num_steps, blocks, 2, generator=generator).to(device))
    optimizer = torch.optim.AdamW([logits], lr=lr, weight_decay=0.0)
    method = _Relaxation(logits)
    history = []
    try:
        xs, ts, ys = record_trajectories(model, sampler, cfg_scale, scale_pow, seed, num_samples, batch_size,
                                          clip_denoised, progress)
        engine = CacheEngine(model, method, sampler)
        bar = tqdm(range(steps), desc="train router", disable=not progress)
        for update in bar:
            routed = 2 * int(torch.randint(num_steps // 2, (1,), generator=generator))
            full_step = num_steps - 1 - (routed + 1)
            index = torch.randperm(num_samples, generator=generator)[:batch_size].to(device)
            y = batch_rows(ys, index)
            x_full, x_next = batch_rows(xs[full_step], index), batch_rows(xs[full_step + 1], index)
            t_full = ts[full_step].expand(len(y))
            t_next = ts[full_step + 1].expand(len(y))
            with torch.no_grad():
                target = model(x_next, t_next, y)
                engine.attach()
                engine.reset()
                method.routed_step = full_step + 1
                engine.begin_step(full_step)
                model(x_full, t_full, y)
            engine.begin_step(full_step + 1)
            relaxed = model(x_next, t_next, y)
            engine.detach()
            mse = ((relaxed - target) ** 2).mean(dim=tuple(range(1, relaxed.dim()))).mean()
            l1_term = torch.sigmoid(logits[routed]).sum()
            loss = mse + l1 * l1_term
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                logits.clamp_(-5.0, 5.0)
            entry = {"update": update, "index": routed, "loss": loss.item(), "mse": mse.item(), "l1": l1_term.item()}
            history.append(entry)
            if log is not None:
                log.write(json.dumps(entry) + "\n")
            bar.set_postfix(loss=f"{entry['loss']:.3g}")
    finally:
        if isinstance(getattr(model, "cache_context", None), CacheEngine):
            model.cache_context = None
        for p, flag in zip(model.parameters(), frozen):
            p.requires_grad_(flag)
    weights = torch.sigmoid(logits.detach()).cpu()
    routed_rows = weights[routed_indices(num_steps)]
    training = {"seed": seed, "steps": steps, "batch_size": batch_size, "num_samples": num_samples, "lr": lr,
                "l1": l1, "cfg_scale": cfg_scale, "scale_pow": scale_pow, "clip_denoised": clip_denoised,
                "final_loss": history[-1]["loss"], "final_mse": history[-1]["mse"]}
    if out is not None:
        save_router(out, logits.detach(), model, sampler, training)
    return {"router": None if out is None else str(out), "sampler": sampler.name,
            "seconds": round(time.perf_counter() - start, 2), **training,
            "routed_modules": int(routed_rows.numel()), "reused_modules_at_0.1": int((routed_rows <= 0.1).sum())}
