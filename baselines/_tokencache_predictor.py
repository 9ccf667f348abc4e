"""TokenCache's Cache Predictor: the calibration of ``tokencache`` v1 and v2 (a helper module, not a method).

How it is trained is ours (no official code is public; the module docstrings of ``tokencache.py``
and ``_tokencache_v2.py`` say which choices are the paper's): the model frozen, on its own
sampling trajectories of calibration samples (``record_trajectories``), one update picks a step
k ≥ 1, fills the cache with every branch output at k − 1 (the paper's t + 1) and at k runs the
paper's relaxation ẑ_{l+1}^t = z_l^t + w ⊙ f_l(z_l^t) + (1 − w) ⊙ f_l(z_l^{t+1}) on the branch
outputs before their adaLN gates (``relaxation_batches``); the loss is the output error relative
to caching everything plus λ·mean(w) (``sparsity``), minimised by Adam in the shared fitting loop
(``fit_relaxation``). v1's w is a table σ(θ[t, l]) (θ initialised at 0); v2's is the
input-dependent α(z, c) of ``_tokencache_v2.py``, after which its mean α over the samples is
stored per (step, block, token).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from tokencache.baselines import _tokencache_v2 as v2
from tokencache.cache import (
    COMPUTE,
    REUSE,
    Blend,
    CacheMethod,
    Calibration,
    fit_relaxation,
    param,
    record_trajectories,
)


def relative_loss_terms(batch, all_cached: torch.Tensor, relaxed: torch.Tensor, mean_keep: torch.Tensor,
                        sparsity: float) -> dict:
    """The predictor's loss (v1 and v2): output error relative to caching everything + λ·mean(w).

    Relative, so that λ (``sparsity``) means the same on every model; w are the keep-weights
    (v1's σ(θ), v2's α).
    """
    error = ((relaxed - batch.target) ** 2).mean()
    scale = ((all_cached - batch.target) ** 2).mean().clamp_min(1e-20)
    rel_error = error / scale
    return {"step": batch.step.k, "loss": rel_error + sparsity * mean_keep, "rel_error": rel_error,
            "mean_w": mean_keep}


def fit_summary(history, updates: int, mean_w: float) -> dict:
    """The training summary: the loss over the first and last tenth of the updates, the final relative error."""
    tail = max(1, updates // 10)
    return {"first_loss": history.first_mean("loss", tail), "final_loss": history.last_mean("loss", tail),
            "final_rel_error": history.last_mean("rel_error", tail), "mean_w": mean_w}


def importance(tensors: dict) -> torch.Tensor:
    """w = σ(θ) of a v1 predictor's tensors (steps, blocks, tokens), float32 on the CPU."""
    return torch.sigmoid(tensors["logits"].float())


class _TokenRelaxation(CacheMethod):
    """Training-time v1: full at every step but ``relaxed_step``, where each branch is
    ``stored·(1 − w) + fresh·w`` per token (``weights`` (blocks, tokens); None: reuse all, w = 0)."""

    name = "tokencache-training"

    def __init__(self):
        self.relaxed_step = -1
        self.weights: Optional[torch.Tensor] = None

    def params(self) -> dict:
        return {}

    def branch_action(self, step, block, branch):
        if step != self.relaxed_step:
            return COMPUTE
        if self.weights is None:
            return REUSE
        return Blend(self.weights[block].unsqueeze(-1))


@dataclass
class CachePredictor(Calibration):
    """TokenCache's Cache Predictor, trained by the paper's relaxation: v1 a table w[t, l] = σ(θ[t, l]),
    v2 an input-dependent network α(z, c) (``_tokencache_v2.py``)."""

    file_param: ClassVar[str] = "predictor"
    format: ClassVar[str] = "tokencache-predictor/2"
    title: ClassVar[str] = "TokenCache Cache Predictor"
    steps: int = param(500, "predictor updates (Adam steps)", min=1)
    batch_size: int = param(16, "calibration samples per update (and per trajectory batch)", min=1)
    num_samples: int = param(64, "calibration trajectories (samples (seed, 0…M−1))", min=1)
    lr: Optional[float] = param(None, "Adam learning rate; None = 0.3 for v1's logit table (each (step, block) row "
                                      "gets ~1/T of the updates), 1e-3 for v2's network", min=1e-12)
    sparsity: float = param(0.5, "λ of the λ·mean(w) pressure, the L1 cost on the keep-weights (the loss is the "
                                 "output error relative to caching everything)", min=0.0)
    seed: int = param(2, "calibration seed: keep it apart from the evaluation seeds", min=0)

    def fit(self, method, model, sampler, sampling, progress=False, log=None):
        if sampler.steps < 2:
            raise ValueError(f"tokencache: {sampler.name} has no step that could reuse a previous one")
        trajectories = record_trajectories(model, sampler, sampling, self.seed, self.num_samples, self.batch_size,
                                           progress)
        if method.version == 2:
            return fit_network(self, model, sampler, trajectories, progress, log)
        device = next(model.parameters()).device
        generator = torch.Generator().manual_seed(self.seed)
        num_steps, blocks, tokens = sampler.steps, int(model.block_count), int(model.num_tokens)
        logits = torch.nn.Parameter(torch.zeros(num_steps, blocks, tokens, device=device))
        optimizer = torch.optim.Adam([logits], lr=0.3 if self.lr is None else self.lr)
        relaxation = _TokenRelaxation()

        def pick_step():
            return 1 + int(torch.randint(num_steps - 1, (1,), generator=generator))

        def loss_terms(batch):
            with torch.no_grad():
                relaxation.weights = None
                all_cached = batch.relaxed()  # w = 0: the error of caching everything
            relaxation.weights = torch.sigmoid(logits[batch.step])
            relaxed = batch.relaxed()
            return relative_loss_terms(batch, all_cached, relaxed, relaxation.weights.mean(), self.sparsity)

        history = fit_relaxation(model, sampler, relaxation, trajectories, optimizer, loss_terms, updates=self.steps,
                                 batch_size=self.batch_size, num_samples=self.num_samples, generator=generator,
                                 pick_step=pick_step, progress=progress, desc="calibrate tokencache", log=log)
        return {"logits": logits.detach()}, fit_summary(history, self.steps,
                                                           float(torch.sigmoid(logits.detach()).mean()))

    def random(self, method, model, sampler, generator):
        """N(0, 1) logits (v1) or a random head and mean α (v2): the tokens computed per step are set by the
        ratios and the schedule, not by the values."""
        if method.version == 2:
            return v2.random_tensors(model, sampler, generator)
        steps, blocks, tokens = sampler.steps, int(model.block_count), int(model.num_tokens)
        return {"logits": torch.randn(steps, blocks, tokens, generator=generator)}

    def figure(self, tensors, ax, title):
        if "mean_alpha" in tensors:
            weights = tensors["mean_alpha"].float().mean(dim=2)
        else:
            weights = torch.sigmoid(tensors["logits"].float()).mean(dim=2)  # (steps, blocks)
        image = ax.imshow(weights.T.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower",
                          interpolation="nearest")
        ax.set(title=title, xlabel="sampling step", ylabel="block")
        ax.figure.colorbar(image, ax=ax, fraction=0.05, label="mean importance w")
        return True


class InputRelaxation(CacheMethod):
    """Training-time v2: at ``relaxed_step`` the predictor runs on block 0's input and every branch
    blends ``stored·(1 − α) + fresh·α`` per sample and token (``use_predictor`` False: reuse all)."""

    name = "tokencache-v2-training"

    def __init__(self, predictor: v2.InputPredictor):
        self.predictor = predictor
        self.relaxed_step = -1
        self.use_predictor = True
        self.alpha: Optional[torch.Tensor] = None

    def params(self) -> dict:
        return {}

    def block_action(self, step, block, inputs):
        if step == self.relaxed_step and block == 0 and self.use_predictor:
            self.alpha = self.predictor(inputs.x, inputs.c)  # (B, L, N), with gradient
        return None

    def branch_action(self, step, block, branch):
        if step != self.relaxed_step:
            return COMPUTE
        if not self.use_predictor:
            return REUSE
        return Blend(self.alpha[:, block].unsqueeze(-1))


def fit_network(settings, model, sampler, trajectories, progress, log):
    """Train the input-dependent predictor, then its mean α per (step, block, token) over the samples."""
    generator = torch.Generator().manual_seed(settings.seed)
    predictor = v2.InputPredictor.for_model(model).train().requires_grad_(True)
    optimizer = torch.optim.Adam(predictor.parameters(), lr=1e-3 if settings.lr is None else settings.lr)
    relaxation = InputRelaxation(predictor)
    num_steps = sampler.steps

    def pick_step():
        return 1 + int(torch.randint(num_steps - 1, (1,), generator=generator))

    def loss_terms(batch):
        with torch.no_grad():
            relaxation.use_predictor = False
            all_cached = batch.relaxed()
        relaxation.use_predictor = True
        relaxed = batch.relaxed()
        return relative_loss_terms(batch, all_cached, relaxed, relaxation.alpha.mean(), settings.sparsity)

    history = fit_relaxation(model, sampler, relaxation, trajectories, optimizer, loss_terms, updates=settings.steps,
                             batch_size=settings.batch_size, num_samples=settings.num_samples, generator=generator,
                             pick_step=pick_step, progress=progress, desc="calibrate tokencache v2", log=log)
    predictor.eval().requires_grad_(False)
    mean_alpha = v2.mean_alpha_over(model, predictor, trajectories, settings.batch_size)
    return ({**v2.tensors_of(predictor), "mean_alpha": mean_alpha},
            fit_summary(history, settings.steps, float(mean_alpha.mean())))
