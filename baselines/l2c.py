"""``l2c``: Learning-to-Cache (Ma et al., arXiv 2406.01733; horseee/learning-to-cache @ d6cc7817, ``DiT/``).

**Inference.** A trained router holds one logit per (step, block, branch), ``logits[i, block,
branch]`` with i the respaced step index as in the official code (i = T−1 is the first,
noisiest step; sampling step k has i = T−1−k) and branch 0 = attention, 1 = MLP. As in the
official ``DiT/models/dynamic_models.py`` (lines 298–312) with ``STE`` (``router_models.py``
154–155): steps with odd i run in full and store every branch; a step with even i reuses
branch (block, b) unless σ(logit[i, block, b]) > θ.

**Router training** (:class:`L2CRouter`, ``tokencache calibrate --method l2c``) mirrors
``DiT/train_router.py`` and ``router_training_losses``: pick a routed index i = 2u (u uniform
in [0, T//2)); run the full model at i+1 to fill the cache; the target is the full model's
output at i on the state the full step produced; the relaxed model at i blends every branch as
``stored·(1 − σ(w)) + fresh·σ(w)``; loss = mean-squared error over all output channels +
λ·Σσ(w_i); AdamW (weight decay 0), logits initialised N(0, 1) and clamped to [−5, 5] after each
update; the backbone is frozen.

What is ours: the training states come from the full model's own trajectories (no dataset; the
official script noises ImageNet images with q_sample and drops 10% of labels), calibration
samples drawn from a seed apart from the evaluation seed, each batch the one the model sees at
inference (with CFG: conditional and null-label rows). At an odd step count T the first step
has an even index T−1; the official code computes it (nothing is stored yet) and then indexes a
routing it never filled, which crashes; here that step computes everything, and the routed
steps are the even i < T−1. The random stand-in for timing reuses half of the routed branches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from tokencache.cache import (
    COMPUTE,
    REUSE,
    Blend,
    CacheMethod,
    Calibration,
    fit_relaxation,
    load_calibration,
    param,
    record_trajectories,
    register_method,
    sampling_steps,
)


def routed_indices(num_steps: int) -> list[int]:
    """Respaced indices whose step may reuse: even i below T−1 (odd i are full steps)."""
    return list(range(0, num_steps - 1, 2))


class _RouterRelaxation(CacheMethod):
    """Training-time L2C: every branch computed, but at ``relaxed_step`` σ(w)-blended with the stored one."""

    name = "l2c-training"

    def __init__(self, logits: torch.nn.Parameter):
        self.logits = logits
        self.relaxed_step = -1
        self.weights = None

    def params(self) -> dict:
        return {}

    def begin_step(self, step):
        if step == self.relaxed_step:
            self.weights = torch.sigmoid(self.logits[step.countdown])

    def branch_action(self, step, block, branch):
        if step == self.relaxed_step:
            return Blend(self.weights[block, 0 if branch == "attn" else 1])
        return COMPUTE


@dataclass
class L2CRouter(Calibration):
    """Learning-to-Cache's router, trained against the frozen model on its own trajectories."""

    file_param: ClassVar[str] = "router"
    format: ClassVar[str] = "tokencache-l2c-router/2"
    title: ClassVar[str] = "L2C router"
    steps: int = param(300, "router updates (AdamW steps)", min=1)
    batch_size: int = param(16, "calibration samples per update (and per trajectory batch)", min=1)
    num_samples: int = param(64, "calibration trajectories (samples (seed, 0…M−1))", min=1)
    lr: float = param(1e-3, "AdamW learning rate (official 1e-3)", min=1e-12)
    l1: float = param(1e-6, "λ of the λ·Σσ(w) term (official DiT-XL/2 DDIM-50: 1e-6)", min=0.0)
    seed: int = param(1, "calibration seed: keep it apart from the evaluation seeds", min=0)

    def fit(self, method, model, sampler, sampling, progress=False, log=None):
        if sampler.steps < 2:
            raise ValueError(f"l2c: {sampler.name} has no step that could reuse a previous one")
        device = next(model.parameters()).device
        generator = torch.Generator().manual_seed(self.seed)
        num_steps, blocks = sampler.steps, int(model.block_count)
        logits = torch.nn.Parameter(torch.randn(num_steps, blocks, 2, generator=generator).to(device))
        optimizer = torch.optim.AdamW([logits], lr=self.lr, weight_decay=0.0)
        trajectories = record_trajectories(model, sampler, sampling, self.seed, self.num_samples, self.batch_size,
                                           progress)
        by_countdown = {step.countdown: step for step in sampling_steps(num_steps)}

        def pick_step():  # a routed index i = 2u; its step k = T−1−i follows the full step at index i + 1
            return by_countdown[2 * int(torch.randint(num_steps // 2, (1,), generator=generator))]

        def loss_terms(batch):  # router_training_losses: MSE over all output channels + λ·Σσ(w_i)
            relaxed = batch.relaxed()
            mse = ((relaxed - batch.target) ** 2).mean(dim=tuple(range(1, relaxed.dim()))).mean()
            routed = batch.step.countdown
            l1_term = torch.sigmoid(logits[routed]).sum()
            return {"index": routed, "loss": mse + self.l1 * l1_term, "mse": mse, "l1": l1_term}

        def clamp():  # the official clamp of the logits to [−5, 5] after each update
            with torch.no_grad():
                logits.clamp_(-5.0, 5.0)

        history = fit_relaxation(model, sampler, _RouterRelaxation(logits), trajectories, optimizer, loss_terms,
                                 updates=self.steps, batch_size=self.batch_size, num_samples=self.num_samples,
                                 generator=generator, pick_step=pick_step, progress=progress, desc="calibrate l2c",
                                 log=log, after_update=clamp)
        weights = torch.sigmoid(logits.detach()).cpu()[routed_indices(num_steps)]
        return {"logits": logits.detach()}, {"final_loss": history[-1]["loss"], "final_mse": history[-1]["mse"],
                                             "routed_modules": int(weights.numel()),
                                             "reused_modules_at_0.1": int((weights <= 0.1).sum())}
    def random(self, method, model, sampler, generator):
        """Routed branches: half of them get logit −5 (σ ≈ 0.007, reused at any θ ≥ 0.01), the others +5."""
        blocks = int(model.block_count)
        logits = torch.full((sampler.steps, blocks, 2), 5.0)
        for i in routed_indices(sampler.steps):
            logits[i].view(-1)[torch.randperm(blocks * 2, generator=generator)[: blocks]] = -5.0
        return {"logits": logits}

    def figure(self, tensors, ax, title):
        weights = torch.sigmoid(tensors["logits"].float())  # (T, L, 2), index i
        grid = weights.flip(0).permute(1, 2, 0).reshape(-1, weights.shape[0])  # rows: block × branch
        image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set(title=title, xlabel="sampling step", ylabel="block × (attn, mlp)")
        ax.figure.colorbar(image, ax=ax, fraction=0.05, label="σ(w): keep computing")
        return True


@register_method
@dataclass
class L2C(CacheMethod):
    """Learning-to-Cache: odd steps full; on even steps reuse the branches a trained router marks (σ(w) ≤ θ)."""

    name = "l2c"
    calibration = L2CRouter
    noop = {"threshold": 0.0}
    search_space = {"threshold": (0.05, 0.1, 0.2, 0.3, 0.5)}  # θ; official 0.1
    router: Optional[str] = param(None, "path of the router file from `tokencache calibrate --method l2c` (required)")
    threshold: float = param(0.1, "θ: reuse a branch unless σ(w) > θ (official: 0.1)", min=0.0, max=1.0)

    def plan_for(self, info):
        """reuse[k][block][branch] on the routed steps (None on the full ones), from the router's σ(w)."""
        weights = torch.sigmoid(load_calibration(self, self.router, info.model, info.sampler_name)["logits"])
        routed = set(routed_indices(info.num_steps))
        return tuple((~(weights[step.countdown] > self.threshold)).tolist() if step.countdown in routed else None
                     for step in info.steps)

    def branch_action(self, step, block, branch):
        mask = self.plan[step]
        if mask is not None and mask[block][0 if branch == "attn" else 1]:
            return REUSE
        return COMPUTE
