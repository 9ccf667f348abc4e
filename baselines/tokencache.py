"""``tokencache``: TokenCache (Lou et al., arXiv 2409.18523) — the method this suite is named for.

No official code is public; what follows says which choices are the paper's and which are ours.

**The method (paper).** On an **I-step** (independent step) every block runs in full and its
branch outputs are cached. On a **P-step** the pruned blocks recompute only their k most
important tokens and reuse the cached update of the other N − k; the other blocks run in full.
A **Cache Predictor** g_θ(l, t) → w ∈ [0, 1]^N scores the tokens of block l at step t;
**adaptive block selection** prunes the blocks whose pruning changes the output least;
**Two-Phase Round-Robin** (TPRR) puts an I-step after every K P-steps, K1 in the first phase
(early, noisy steps are more alike) and K2 < K1 after.

**Ours.**

* Predictor parameterisation — a table of logits, w[t, l] = σ(θ[t, l]), θ of shape (steps,
  blocks, tokens). The predictor sees only (l, t), which for one model and sampler take T × L
  values, so any network on (l, t) is a reparameterisation of this table with less freedom; the
  table costs nothing while sampling (the top-k order is fixed once per run) and is small
  (DiT-XL/2, DDPM-250: 1.8 M values).
* Training (:class:`CachePredictor`, ``tokencache calibrate --method tokencache``), the model
  frozen, on its own sampling trajectories of calibration samples: one update picks a step
  k ≥ 1, fills the cache with every branch output at k − 1 (the paper's t + 1), and at k runs
  the paper's relaxation ẑ_{l+1}^t = z_l^t + w ⊙ f_l(z_l^t) + (1 − w) ⊙ f_l(z_l^{t+1}), on the
  attention and MLP outputs before their adaLN gates (equal to the block-level form when the
  two steps' gates agree). Loss: the output error relative to caching everything plus λ·mean(w)
  (``sparsity``), so that λ means the same on every model; Adam on θ (initialised at 0).
* Token recompute: queries from the k tokens, keys and values from all N (the chosen tokens
  get their exact values), the MLP on the k tokens; k = N − round(ρ·N).
* Adaptive block selection: on each P-step the round(β·L) blocks pruned are those with the
  smallest Σ w[t, l, n] over the N − k tokens they would reuse (the importance the relaxed
  network would lose). The ablation's ``uniform`` prunes every block at ratio ρ·β instead.
* TPRR: an I-step first and after every K P-steps, K = K1 while the step is in the first
  ``phase_boundary`` of the steps, K2 after. K1, K2 and the boundary are not published:
  defaults (DDIM K1 = 3, K2 = 2; DDPM K1 = 4, K2 = 2; ρ = 0.75, β = 0.5, boundary 0.5) come from
  the testbed sweep (README, "TokenCache").
* Token choice for the ablation: ``random`` (a seeded permutation per step and block) and
  ``attention`` (ToCa's s1 from the block's last I-step).

Overhead counters: ``attention_scores`` (attention token choice: maps reduced on I-steps) and
``token_scores`` (its per-P-step sort of N scores).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

from tokencache.cache import COMPUTE, REUSE, Blend, CacheMethod, Calibration, Compute, Subset, param, register_method
from tokencache.cache.calibration import load_calibration, record_trajectories, relaxation_batches

#: (K1, K2) by sampler loop when not given: chosen by the testbed ablation.
DEFAULT_INTERVALS = {"ddim": (3, 2), "ddpm": (4, 2)}


def tprr_schedule(num_steps: int, k1: int, k2: int, phase_boundary: float) -> list[bool]:
    """Two-Phase Round-Robin: True where sampling step s (0 = first, noisiest) is an I-step.

    Step 0 is an I-step; after an I-step come K P-steps, K = K1 while s < round(phase_boundary·T)
    and K2 from then on (the K of the step being decided).
    """
    boundary = round(phase_boundary * num_steps)
    full, since = [], 0
    for step in range(num_steps):
        interval = k1 if step < boundary else k2
        is_full = step == 0 or since >= interval
        since = 0 if is_full else since + 1
        full.append(is_full)
    return full


def adaptive_blocks(weights: torch.Tensor, num_pruned: int, keep: int) -> list[int]:
    """The ``num_pruned`` blocks of one step whose pruning loses the least importance.

    ``weights`` (blocks, tokens) = w[t]; a pruned block keeps its ``keep`` most important tokens,
    so it loses the sum of the others' w. Ties go to the earlier block. Returns sorted indices.
    """
    ordered = torch.sort(weights, dim=1, descending=True, stable=True).values
    lost = ordered[:, keep:].sum(dim=1).double()
    order = torch.argsort(lost, stable=True)
    return sorted(order[:num_pruned].tolist())


# ---------------------------------------------------------------------- the Cache Predictor


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


@dataclass
class CachePredictor(Calibration):
    """TokenCache's Cache Predictor w[t, l] = σ(θ[t, l]) ∈ [0, 1]^N, trained by the paper's relaxation."""

    file_param: ClassVar[str] = "predictor"
    format: ClassVar[str] = "tokencache-predictor/2"
    title: ClassVar[str] = "TokenCache Cache Predictor"
    steps: int = param(500, "predictor updates (Adam steps)", min=1)
    batch_size: int = param(16, "calibration samples per update (and per trajectory batch)", min=1)
    num_samples: int = param(64, "calibration trajectories (samples (seed, 0…M−1))", min=1)
    lr: float = param(0.3, "Adam learning rate on the logits (each (step, block) row gets ~1/T of the updates)",
                      min=1e-12)
    sparsity: float = param(0.5, "λ of the λ·mean(w) pressure (the loss is the output error relative to caching "
                                 "everything)", min=0.0)
    seed: int = param(2, "calibration seed: keep it apart from the evaluation seeds", min=0)

    def fit(self, method, model, sampler, sampling, progress=False, log=None):
        if sampler.steps < 2:
            raise ValueError(f"tokencache: {sampler.name} has no step that could reuse a previous one")
        device = next(model.parameters()).device
        generator = torch.Generator().manual_seed(self.seed)
        num_steps, blocks, tokens = sampler.steps, int(model.block_count), int(model.num_tokens)
        logits = torch.nn.Parameter(torch.zeros(num_steps, blocks, tokens, device=device))
        optimizer = torch.optim.Adam([logits], lr=self.lr)
        relaxation = _TokenRelaxation()
        trajectories = record_trajectories(model, sampler, sampling, self.seed, self.num_samples, self.batch_size,
                                           progress)

        def pick_step():
            return 1 + int(torch.randint(num_steps - 1, (1,), generator=generator))

        history = []
        for update, batch in enumerate(relaxation_batches(model, sampler, relaxation, trajectories, self.steps,
                                                          self.batch_size, self.num_samples, generator, pick_step,
                                                          progress, "calibrate tokencache")):
            with torch.no_grad():
                relaxation.weights = None
                all_cached = batch.relaxed()  # w = 0: the error of caching everything
            relaxation.weights = torch.sigmoid(logits[batch.step])
            relaxed = batch.relaxed()
            error = ((relaxed - batch.target) ** 2).mean()
            scale = ((all_cached - batch.target) ** 2).mean().clamp_min(1e-20)
            mean_w = relaxation.weights.mean()
            loss = error / scale + self.sparsity * mean_w
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            entry = {"update": update, "step": batch.step, "loss": loss.item(), "rel_error": (error / scale).item(),
                     "mean_w": mean_w.item()}
            batch.loss = entry["loss"]
            history.append(entry)
            if log is not None:
                log.write(json.dumps(entry) + "\n")
        tail = max(1, self.steps // 10)
        return {"logits": logits.detach()}, {
            "first_loss": sum(h["loss"] for h in history[:tail]) / tail,
            "final_loss": sum(h["loss"] for h in history[-tail:]) / tail,
            "final_rel_error": sum(h["rel_error"] for h in history[-tail:]) / tail,
            "mean_w": float(torch.sigmoid(logits.detach()).mean())}

    def random(self, method, model, sampler, generator):
        """N(0, 1) logits: the tokens computed per step are set by ρ, β and TPRR, not by the values."""
        return {"logits": torch.randn(sampler.steps, int(model.block_count), int(model.num_tokens),
                                      generator=generator)}

    def figure(self, tensors, ax, title):
        weights = torch.sigmoid(tensors["logits"].float()).mean(dim=2)  # (steps, blocks)
        image = ax.imshow(weights.T.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower",
                          interpolation="nearest")
        ax.set(title=title, xlabel="sampling step", ylabel="block")
        ax.figure.colorbar(image, ax=ax, fraction=0.05, label="mean importance w")
        return True


def importance(tensors: dict) -> torch.Tensor:
    """w = σ(θ) of a predictor's tensors (steps, blocks, tokens), float32 on the CPU."""
    return torch.sigmoid(tensors["logits"].float())


# ---------------------------------------------------------------------- the method


@dataclass
class TokenCacheState:
    """Per generation: each block's attention score from its last I-step (token_choice=attention)."""

    scores: dict = field(default_factory=dict)
    chosen: Optional[torch.Tensor] = None


@register_method
@dataclass
class TokenCache(CacheMethod):
    """TokenCache: Two-Phase Round-Robin I-steps; on P-steps the adaptively chosen blocks recompute only the predictor's top tokens."""

    name = "tokencache"
    calibration = CachePredictor
    State = TokenCacheState
    noop = {"cache_ratio": 0.0}
    predictor: Optional[str] = param(None, "g_θ: Cache Predictor file from `tokencache calibrate --method tokencache` "
                                           "(needed for token_choice=predictor or block_selection=adaptive)")
    cache_ratio: float = param(0.75, "ρ: fraction of a pruned block's tokens reused on P-steps", min=0.0, max=1.0)
    block_ratio: float = param(0.5, "β: fraction of blocks pruned on P-steps", min=0.0, max=1.0)
    k1: Optional[int] = param(None, "K1: P-steps between I-steps in phase 1; None = default for the sampler "
                                    "(DDIM 3, DDPM 4); 0 = every step an I-step", min=0)
    k2: Optional[int] = param(None, "K2: P-steps between I-steps in phase 2 (≤ K1; = K1 is one fixed interval); "
                                    "None = default (DDIM 2, DDPM 2)", min=0)
    phase_boundary: float = param(0.5, "fraction of the sampling steps in phase 1", min=0.0, max=1.0)
    block_selection: str = param("adaptive", "which blocks are pruned: adaptive (least importance lost) or uniform "
                                             "(every block at ratio ρ·β)", choices=("adaptive", "uniform"))
    token_choice: str = param("predictor", "which tokens are recomputed: predictor, random or attention (ToCa's "
                                           "attention score)", choices=("predictor", "random", "attention"))
    seed: int = param(0, "seed of token_choice=random", min=0)

    def setup(self, info):
        super().setup(info)
        T, L, N = info.num_steps, info.block_count, info.num_tokens
        default_k1, default_k2 = DEFAULT_INTERVALS["ddpm" if info.sampler_loop == "ddpm" else "ddim"]
        self.intervals = (default_k1 if self.k1 is None else self.k1, default_k2 if self.k2 is None else self.k2)
        if self.intervals[1] > self.intervals[0]:
            raise ValueError(f"tokencache: K2 = {self.intervals[1]} must not exceed K1 = {self.intervals[0]} "
                             "(phase 2 refreshes more often)")
        self.full = tprr_schedule(T, *self.intervals, self.phase_boundary)
        needs_predictor = self.token_choice == "predictor" or self.block_selection == "adaptive"
        if needs_predictor and not self.predictor:
            raise ValueError("tokencache: set predictor=PATH (make one with `tokencache calibrate --method tokencache`), "
                             "or use token_choice=random|attention with block_selection=uniform")
        w = importance(load_calibration(self, self.predictor, info.model, info.sampler_name)) if needs_predictor else None
        if self.block_selection == "adaptive":
            keep = N - round(self.cache_ratio * N)
            pruned = round(self.block_ratio * L)
            self.keep = {(t, l): keep for t in range(T) if not self.full[t]
                         for l in adaptive_blocks(w[t], pruned, keep)}
        else:
            keep = N - round(self.cache_ratio * self.block_ratio * N)
            self.keep = {(t, l): keep for t in range(T) if not self.full[t] for l in range(L)}
        self.tokens = {}
        if self.token_choice in ("predictor", "random"):
            generator = torch.Generator().manual_seed(self.seed)
            chosen = {}
            for (t, l), k in sorted(self.keep.items()):
                if 0 < k < N:
                    if self.token_choice == "predictor":
                        chosen[t, l] = torch.argsort(w[t, l], descending=True, stable=True)[:k]
                    else:
                        chosen[t, l] = torch.randperm(N, generator=generator)[:k]
            if chosen:  # one host→device copy for the whole schedule
                stacked = torch.cat(list(chosen.values())).to(info.device or "cpu")
                for key, part in zip(chosen, torch.split(stacked, [len(v) for v in chosen.values()])):
                    self.tokens[key] = part.unsqueeze(0)
        self.needs_attention = self.token_choice == "attention" and any(0 < k < N for k in self.keep.values())
        self.full_attention = Compute(attention=True) if self.needs_attention else COMPUTE

    def resolved(self):
        return {**self.params(), "k1": self.intervals[0], "k2": self.intervals[1],
                "i_steps": int(sum(self.full))}

    def overhead_macs(self, shape):
        """``attention_scores`` as ToCa's (H·N² + N² + N per map); ``token_scores`` (a sort: no MACs)."""
        n = shape.tokens
        return {"attention_scores": shape.heads * n * n + n * n + n, "token_scores": 0}

    def branch_action(self, step, block, branch):
        if self.full[step]:
            return self.full_attention if branch == "attn" else COMPUTE
        k = self.keep.get((step, block))
        if k is None or k >= self.info.num_tokens:
            return COMPUTE
        if k == 0:
            return REUSE
        if self.token_choice == "attention":
            if branch == "attn":  # one choice per block and step, shared by its MLP
                self.state.chosen = torch.argsort(self.state.scores[block], dim=1, descending=True, stable=True)[:, :k]
                self.count("token_scores", self.info.num_tokens)
            return Subset(self.state.chosen)
        return Subset(self.tokens[step, block])

    def observe(self, step, block, branch, *, x, output, attention, rows):
        if attention is not None:
            self.state.scores[block] = F.normalize(attention.mean(dim=1).sum(dim=1), dim=1, p=2)
            self.count("attention_scores", 1)
