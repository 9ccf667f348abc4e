"""TokenCache's Cache Predictor g_θ(l, t) → w ∈ [0, 1]^n (Lou et al., arXiv 2409.18523).

**Parameterisation: a table of logits**, ``w[t, l] = σ(θ[t, l])`` with θ of shape (steps,
blocks, tokens). The paper's predictor sees only (l, t), and for a given model and sampler these
range over a finite set of T × L pairs, so any network on (l, t) is a reparameterisation of this
table with less freedom; the table learns every (l, t) independently, costs nothing at inference
(the top-k order is fixed once per run) and is small (DiT-XL/2, DDPM-250: 250 × 28 × 256 = 1.8 M
values). What a network would add — sharing between neighbouring steps — matters only for
(l, t) pairs training never visits, and training samples every step uniformly.

**Training** (:func:`train_predictor`), the model frozen: the states z^t are the full model's
own sampling trajectories of calibration samples (seeds kept apart from evaluation seeds). One
update picks a step k ≥ 1 (its predecessor k − 1 is the paper's t + 1, the noisier step), runs
the full model at k − 1 to fill the cache with every block's branch outputs f_l(z_l^{t+1}), and
at k runs the relaxed network, which blends every branch per token,

    ẑ_{l+1}^t = z_l^t + w ⊙ f_l(z_l^t) + (1 − w) ⊙ f_l(z_l^{t+1}),

applied, as the engine caches, to the attention and MLP outputs before their adaLN gates (equal
to the paper's block-level form when the gates of the two steps agree; one w per (l, t, token)
for both branches). The loss is the relative output error plus a sparsity pressure:

    ‖z_{L+1}^t − ẑ_{L+1}^t‖² / ‖z_{L+1}^t − ẑ_{L+1}^t|_{w=0}‖² + λ · mean(w),

normalised by the error of caching everything so that λ means the same on every model: the
predictor may keep a token only if recomputing it removes more than λ of the caching error per
unit of recompute budget. Adam on θ (initialised at 0, w = ½).

A predictor file (``torch.save`` dict, format ``tokencache-predictor/1``) records the logits,
the model configuration and a parameter checksum, the sampler and the training settings;
loading it for another model or sampler is a :class:`PredictorError`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Union

import torch

from tokencache.cache.actions import COMPUTE, REUSE, Blend
from tokencache.cache.calibration import batch_rows, load_tied, record_trajectories, save_tied
from tokencache.cache.engine import CacheEngine
from tokencache.cache.methods import CacheMethod
from tokencache.sampling import Sampler, parse_sampler

FORMAT = "tokencache-predictor/1"


class PredictorError(ValueError):
    """A predictor file that is missing, malformed, or made for another model or sampler."""


def save_predictor(path: Union[str, Path], logits: torch.Tensor, model: torch.nn.Module,
                   sampler: Union[Sampler, str], training: Optional[dict] = None) -> None:
    """Write a predictor file atomically (see the module docstring for its content)."""
    sampler = parse_sampler(sampler) if isinstance(sampler, str) else sampler
    want = (sampler.steps, int(model.block_count), int(model.num_tokens))
    if tuple(logits.shape) != want:
        raise PredictorError(f"predictor logits {tuple(logits.shape)} do not match {want[0]} steps × "
                             f"{want[1]} blocks × {want[2]} tokens")
    save_tied(path, FORMAT, logits, model, sampler, training)


def load_predictor(path: Union[str, Path], model: Optional[torch.nn.Module] = None,
                   sampler: Union[Sampler, str, None] = None) -> dict:
    """Read a predictor file; with ``model``/``sampler`` check it was trained for them."""
    return load_tied(path, FORMAT, PredictorError, "predictor", "Cache Predictor", "tokencache train-predictor",
                     model, sampler)


def importance(path_or_obj: Union[str, Path, dict]) -> torch.Tensor:
    """w = σ(θ) of a predictor file (steps, blocks, tokens), float32 on the CPU."""
    obj = path_or_obj if isinstance(path_or_obj, dict) else load_predictor(path_or_obj)
    return torch.sigmoid(obj["logits"].float())


class _TokenRelaxation(CacheMethod):
    """Training-time TokenCache: full at every step but ``relaxed_step``, where each branch is
    ``stored·(1 − w) + fresh·w`` per token (``weights`` (blocks, tokens); None: reuse all, w = 0)."""

    name = "tokencache-training"

    def __init__(self):
        self.relaxed_step = -1
        self.weights: Optional[torch.Tensor] = None

    def params(self) -> dict:
        return {}

    def branch_action(self, step: int, block: int, branch: str):
        if step != self.relaxed_step:
            return COMPUTE
        if self.weights is None:
            return REUSE
        return Blend(self.weights[block].unsqueeze(-1))


def train_predictor(model: torch.nn.Module, sampler: Union[Sampler, str], *, cfg_scale: float = 1.5,
                    scale_pow: Optional[float] = None, steps: int = 500, batch_size: int = 16,
                    num_samples: int = 64, lr: float = 0.3, sparsity: float = 0.5, seed: int = 2,
                    clip_denoised: bool = False, out: Union[str, Path, None] = None, progress: bool = False,
                    log=None) -> dict:
    """Train a Cache Predictor for ``model`` (frozen) and ``sampler``; write it to ``out`` if given.

    :param cfg_scale, scale_pow, clip_denoised: as in sampling; trajectories and batches are
        the ones a run with these settings produces (with CFG the conditional and null rows).
    :param steps: optimiser updates; each uses ``batch_size`` samples drawn from ``num_samples``
        calibration trajectories with seeds ``(seed, i)`` — keep ``seed`` apart from the
        evaluation seeds (sampling defaults to 0, the L2C router to 1).
    :param lr: Adam learning rate on the logits; ``sparsity``: λ of the λ·mean(w) pressure.
    :param log: optional text file; one JSON line per update (update, step, loss, rel_error,
        mean_w).
    :return: summary dict (seconds, settings, first/last losses averaged over 10% of updates,
        mean w).
    """
    from tqdm import tqdm

    sampler = parse_sampler(sampler) if isinstance(sampler, str) else sampler
    if steps < 1 or batch_size < 1 or num_samples < 1 or lr <= 0 or sparsity < 0:
        raise ValueError("train_predictor: steps, batch_size, num_samples must be ≥ 1, lr > 0 and sparsity ≥ 0")
    if sampler.steps < 2:
        raise ValueError(f"train_predictor: {sampler.name} has no step that could reuse a previous one")
    if getattr(model, "cache_context", None) is not None:
        raise RuntimeError("train_predictor: detach the model's cache context first")
    start = time.perf_counter()
    device = next(model.parameters()).device
    frozen = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    num_steps, blocks, tokens = sampler.steps, int(model.block_count), int(model.num_tokens)
    logits = torch.nn.Parameter(torch.zeros(num_steps, blocks, tokens, device=device))
    optimizer = torch.optim.Adam([logits], lr=lr)
    method = _TokenRelaxation()
    history = []
    try:
        xs, ts, ys = record_trajectories(model, sampler, cfg_scale, scale_pow, seed, num_samples, batch_size,
                                         clip_denoised, progress)
        engine = CacheEngine(model, method, sampler)
        bar = tqdm(range(steps), desc="train predictor", disable=not progress)
        for update in bar:
            step = 1 + int(torch.randint(num_steps - 1, (1,), generator=generator))
            index = torch.randperm(num_samples, generator=generator)[:batch_size].to(device)
            y = batch_rows(ys, index)
            x_prev, x_now = batch_rows(xs[step - 1], index), batch_rows(xs[step], index)
            t_prev, t_now = ts[step - 1].expand(len(y)), ts[step].expand(len(y))
            with torch.no_grad():
                target = model(x_now, t_now, y)  # z_{L+1}^t: the full model at step t
                engine.attach()
                engine.reset()
                method.relaxed_step = step
                engine.begin_step(step - 1)
                model(x_prev, t_prev, y)  # fills the cache: f_l(z_l^{t+1}) of every block and branch
                engine.begin_step(step)
                method.weights = None
                all_cached = model(x_now, t_now, y)  # w = 0: the error of caching everything
            method.weights = torch.sigmoid(logits[step])
            relaxed = model(x_now, t_now, y)
            engine.detach()
            error = ((relaxed - target) ** 2).mean()
            scale = ((all_cached - target) ** 2).mean().clamp_min(1e-20)
            mean_w = method.weights.mean()
            loss = error / scale + sparsity * mean_w
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            entry = {"update": update, "step": step, "loss": loss.item(), "rel_error": (error / scale).item(),
                     "mean_w": mean_w.item()}
            history.append(entry)
            if log is not None:
                log.write(json.dumps(entry) + "\n")
            bar.set_postfix(loss=f"{entry['loss']:.3g}", w=f"{entry['mean_w']:.2f}")
    finally:
        if isinstance(getattr(model, "cache_context", None), CacheEngine):
            model.cache_context = None
        for p, flag in zip(model.parameters(), frozen):
            p.requires_grad_(flag)
    tail = max(1, steps // 10)
    training = {"seed": seed, "steps": steps, "batch_size": batch_size, "num_samples": num_samples, "lr": lr,
                "sparsity": sparsity, "cfg_scale": cfg_scale, "scale_pow": scale_pow, "clip_denoised": clip_denoised,
                "first_loss": sum(h["loss"] for h in history[:tail]) / tail,
                "final_loss": sum(h["loss"] for h in history[-tail:]) / tail,
                "final_rel_error": sum(h["rel_error"] for h in history[-tail:]) / tail}
    if out is not None:
        save_predictor(out, logits.detach(), model, sampler, training)
    return {"predictor": None if out is None else str(out), "sampler": sampler.name,
            "seconds": round(time.perf_counter() - start, 2), **training,
            "mean_w": float(torch.sigmoid(logits.detach()).mean())}
