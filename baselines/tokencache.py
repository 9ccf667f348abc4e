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
  the testbed sweep (docs/methods.md, "TokenCache: the paper and ours").
* Token choice for the ablation: ``random`` (a seeded permutation per step and block) and
  ``attention`` (ToCa's s1 from the block's last I-step).

**The later version (v2, ``version=2``).** The v2 abstract (arXiv 2409.18523v2) says one
Cache Predictor "hierarchically" decides which tokens to prune and reuse, "allocating pruning
ratio to each block", and at which steps to cache; its method text is not public, so the
following is ours, built to that description:

* an input-dependent predictor α = σ(head(block(z, c))) ∈ [0, 1]^{L×N}: one transformer block
  (initialised as a copy of the backbone's first block; +1/L of the backbone's block
  parameters, 3.57% for DiT-XL/2) on the backbone's own block-0 input z (patch embedding of
  x_t plus position) and conditioning c (timestep and label), then a linear head to one score
  per (block, token); it runs on every P-step and its MACs are counted (``predictor``);
* training: the relaxation of v1 with the per-sample α as the blend weights, loss = output error
  relative to caching everything + λ·mean(α) (the L1 cost on the keep-weights); the backbone
  frozen;
* per-block ratios from one global ratio r (``global_ratio``, default ρ·β, the share v1 reuses):
  over the calibration samples, the mean α of each (step, block, token); on each P-step the
  (1 − r)·L·N largest of these are "update", which fixes how many tokens each block recomputes
  (the same for every sample, so a batch computes alike); each sample then recomputes its own
  highest-α tokens in each block;
* full steps from the predictor's statistics: as many I-steps as v1's TPRR would place (equal
  cost), at step 0 and at uniform percentiles of the cumulative mean α over the steps (more
  I-steps where the predictor wants more recomputed); ``i_steps=tprr`` keeps v1's schedule;
* not done: the last blocks never cached / LoRA (reported only by secondary notes).

Overhead counters: ``attention_scores`` (attention token choice: maps reduced on I-steps),
``token_scores`` (its per-P-step sort of N scores) and ``predictor`` (one v2 predictor forward
per row; a transformer block and a head, which a trace of the model sees).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from tokencache.cache import COMPUTE, REUSE, Blend, CacheMethod, Calibration, Compute, Subset, param, register_method
from tokencache.cache.calibration import load_calibration, record_trajectories, relaxation_batches
from tokencache.models.layers import Linear

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


def first_block(model: nn.Module) -> nn.Module:
    """The backbone's first transformer block in execution order (its copy starts the v2 predictor)."""
    from tokencache.metrics.flops import execution_blocks

    return execution_blocks(model)[0]


class InputPredictor(nn.Module):
    """v2's Cache Predictor: α = σ(head(block(z, c))) per (token, block), from the block-0 input z and c."""

    def __init__(self, block: nn.Module, blocks: int):
        super().__init__()
        self.block = block
        hidden = block.attn.proj.out_features
        self.head = Linear(hidden, blocks)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)  # α = ½ everywhere at the start

    @classmethod
    def for_model(cls, model: nn.Module) -> "InputPredictor":
        return cls(copy.deepcopy(first_block(model)), int(model.block_count)).to(next(model.parameters()).device)

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """z (B, N, D), c (B, D) → α (B, L, N) in [0, 1]."""
        return torch.sigmoid(self.head(self.block(z, c))).transpose(1, 2)


def tensors_of(predictor: InputPredictor) -> dict:
    return {f"predictor.{k}": v for k, v in predictor.state_dict().items()}


def load_predictor_network(model: nn.Module, tensors: dict) -> InputPredictor:
    predictor = InputPredictor.for_model(model)
    state = {k[len("predictor."):]: v for k, v in tensors.items() if k.startswith("predictor.")}
    predictor.load_state_dict(state)
    return predictor.eval().requires_grad_(False)


def percentile_steps(step_mass: torch.Tensor, count: int) -> list[bool]:
    """I-steps: step 0 and the first steps where the cumulative mass reaches j/count, j = 1…count−1.

    Steps already chosen are skipped to the next free one, so exactly ``count`` steps are full.
    """
    num_steps = len(step_mass)
    count = max(1, min(count, num_steps))
    cumulative = torch.cumsum(step_mass.double().clamp_min(0), 0)
    cumulative = cumulative / cumulative[-1] if cumulative[-1] > 0 else torch.linspace(1 / num_steps, 1, num_steps)
    full = [False] * num_steps
    full[0] = True
    for j in range(1, count):
        step = int(torch.searchsorted(cumulative, torch.tensor(j / count, dtype=torch.float64)))
        while step < num_steps and full[step]:
            step += 1
        if step == num_steps:
            step = next(s for s in range(num_steps) if not full[s])
        full[step] = True
    return full


def block_budget(mean_alpha: torch.Tensor, global_ratio: float) -> list[int]:
    """Tokens each block recomputes when a share ``global_ratio`` of the (block, token) pairs is reused.

    ``mean_alpha`` (L, N): the (1 − r)·L·N largest entries are "update"; returns their count per block.
    """
    blocks, tokens = mean_alpha.shape
    update = round((1 - global_ratio) * blocks * tokens)
    order = torch.argsort(mean_alpha.flatten(), descending=True, stable=True)[:update]
    return torch.bincount(order // tokens, minlength=blocks).tolist()


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


class _InputRelaxation(CacheMethod):
    """Training-time TokenCache v2: at ``relaxed_step`` the predictor runs on block 0's input and every
    branch blends ``stored·(1 − α) + fresh·α`` per sample and token (``use_predictor`` False: reuse all)."""

    name = "tokencache-v2-training"

    def __init__(self, predictor: InputPredictor):
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

    def branch_action(self, step: int, block: int, branch: str):
        if step != self.relaxed_step:
            return COMPUTE
        if not self.use_predictor:
            return REUSE
        return Blend(self.alpha[:, block].unsqueeze(-1))


@dataclass
class CachePredictor(Calibration):
    """TokenCache's Cache Predictor, trained by the paper's relaxation: v1 a table w[t, l] = σ(θ[t, l]),
    v2 an input-dependent network α(z, c) (see the module docstring)."""

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
            return self._fit_network(model, sampler, trajectories, progress, log)
        device = next(model.parameters()).device
        generator = torch.Generator().manual_seed(self.seed)
        num_steps, blocks, tokens = sampler.steps, int(model.block_count), int(model.num_tokens)
        logits = torch.nn.Parameter(torch.zeros(num_steps, blocks, tokens, device=device))
        optimizer = torch.optim.Adam([logits], lr=0.3 if self.lr is None else self.lr)
        relaxation = _TokenRelaxation()

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
        return {"logits": logits.detach()}, self._summary(history, float(torch.sigmoid(logits.detach()).mean()))

    def _summary(self, history: list, mean_w: float) -> dict:
        tail = max(1, self.steps // 10)
        return {"first_loss": sum(h["loss"] for h in history[:tail]) / tail,
                "final_loss": sum(h["loss"] for h in history[-tail:]) / tail,
                "final_rel_error": sum(h["rel_error"] for h in history[-tail:]) / tail, "mean_w": mean_w}

    def _fit_network(self, model, sampler, trajectories, progress, log):
        """v2: train the input-dependent predictor, then its mean α per (step, block, token) over the samples."""
        generator = torch.Generator().manual_seed(self.seed)
        predictor = InputPredictor.for_model(model).train().requires_grad_(True)
        optimizer = torch.optim.Adam(predictor.parameters(), lr=1e-3 if self.lr is None else self.lr)
        relaxation = _InputRelaxation(predictor)
        num_steps = sampler.steps

        def pick_step():
            return 1 + int(torch.randint(num_steps - 1, (1,), generator=generator))

        history = []
        for update, batch in enumerate(relaxation_batches(model, sampler, relaxation, trajectories, self.steps,
                                                          self.batch_size, self.num_samples, generator, pick_step,
                                                          progress, "calibrate tokencache v2")):
            with torch.no_grad():
                relaxation.use_predictor = False
                all_cached = batch.relaxed()
            relaxation.use_predictor = True
            relaxed = batch.relaxed()
            error = ((relaxed - batch.target) ** 2).mean()
            scale = ((all_cached - batch.target) ** 2).mean().clamp_min(1e-20)
            mean_alpha = relaxation.alpha.mean()
            loss = error / scale + self.sparsity * mean_alpha
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            entry = {"update": update, "step": batch.step, "loss": loss.item(), "rel_error": (error / scale).item(),
                     "mean_w": mean_alpha.item()}
            batch.loss = entry["loss"]
            history.append(entry)
            if log is not None:
                log.write(json.dumps(entry) + "\n")
        predictor.eval().requires_grad_(False)
        mean_alpha = self._mean_alpha(model, predictor, trajectories)
        return {**tensors_of(predictor), "mean_alpha": mean_alpha}, self._summary(history, float(mean_alpha.mean()))

    @torch.no_grad()
    def _mean_alpha(self, model, predictor, trajectories) -> torch.Tensor:
        """Mean α over the calibration samples (and their CFG rows), per (step, block, token)."""
        from tokencache.cache.calibration import batch_rows

        xs, ts, ys = trajectories
        device = next(model.parameters()).device
        out = []
        for step in range(len(xs)):
            total = 0
            for lo in range(0, len(ys), self.batch_size):
                index = torch.arange(lo, min(lo + self.batch_size, len(ys)), device=device)
                x, y = batch_rows(xs[step], index), batch_rows(ys, index)
                t = ts[step].expand(len(y))
                z = model.x_embedder(x) + model.pos_embed
                c = model.t_embedder(t) + model.y_embedder(y, False)
                total = total + predictor(z, c).sum(dim=0)
            out.append(total / (len(ys) * xs[step].shape[1]))
        return torch.stack(out).cpu()

    def random(self, method, model, sampler, generator):
        """N(0, 1) logits (v1) or a random head and mean α (v2): the tokens computed per step are set by the
        ratios and the schedule, not by the values."""
        steps, blocks, tokens = sampler.steps, int(model.block_count), int(model.num_tokens)
        if method.version == 1:
            return {"logits": torch.randn(steps, blocks, tokens, generator=generator)}
        predictor = InputPredictor.for_model(model)
        with torch.no_grad():
            predictor.head.weight.copy_(torch.randn(predictor.head.weight.shape, generator=generator) * 0.01)
        return {**tensors_of(predictor), "mean_alpha": torch.rand(steps, blocks, tokens, generator=generator)}

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


def importance(tensors: dict) -> torch.Tensor:
    """w = σ(θ) of a predictor's tensors (steps, blocks, tokens), float32 on the CPU."""
    return torch.sigmoid(tensors["logits"].float())


# ---------------------------------------------------------------------- the method


@dataclass
class TokenCacheState:
    """Per generation: each block's attention score from its last I-step (token_choice=attention), the
    tokens chosen for the current block, and v2's per-sample choices of the current P-step."""

    scores: dict = field(default_factory=dict)
    chosen: Optional[torch.Tensor] = None
    tokens: dict = field(default_factory=dict)  # v2: block → (B, k) tokens of this P-step


@register_method
@dataclass
class TokenCache(CacheMethod):
    """TokenCache: Two-Phase Round-Robin I-steps; on P-steps the adaptively chosen blocks recompute only the predictor's top tokens (v2: an input-dependent predictor, per-block ratios from one global ratio, I-steps from its statistics)."""

    name = "tokencache"
    calibration = CachePredictor
    State = TokenCacheState
    noop = {"cache_ratio": 0.0, "global_ratio": 0.0}
    traced_overhead = ("predictor",)
    variants = ({"version": 2}, {"token_choice": "attention"}, {"block_selection": "uniform", "token_choice": "random"})
    predictor: Optional[str] = param(None, "g_θ: Cache Predictor file from `tokencache calibrate --method tokencache` "
                                           "(needed for token_choice=predictor or block_selection=adaptive, and v2)")
    version: int = param(1, "1: the paper's (l, t) predictor, adaptive blocks, TPRR; 2: the later input-dependent "
                            "predictor, per-block ratios and I-steps from its statistics (see the module doc)",
                         min=1, max=2)
    cache_ratio: float = param(0.75, "ρ: fraction of a pruned block's tokens reused on P-steps", min=0.0, max=1.0)
    block_ratio: float = param(0.5, "β: fraction of blocks pruned on P-steps", min=0.0, max=1.0)
    global_ratio: Optional[float] = param(None, "v2 r: fraction of (block, token) pairs reused on P-steps; None = ρ·β, "
                                                "v1's share", min=0.0, max=1.0)
    k1: Optional[int] = param(None, "K1: P-steps between I-steps in phase 1; None = default for the sampler "
                                    "(DDIM 3, DDPM 4); 0 = every step an I-step", min=0)
    k2: Optional[int] = param(None, "K2: P-steps between I-steps in phase 2 (≤ K1; = K1 is one fixed interval); "
                                    "None = default (DDIM 2, DDPM 2)", min=0)
    phase_boundary: float = param(0.5, "fraction of the sampling steps in phase 1", min=0.0, max=1.0)
    i_steps: Optional[str] = param(None, "where the I-steps go: tprr (K1, K2) or predictor (v2: as many, at "
                                         "percentiles of the predictor's statistics); None = v1 tprr, v2 predictor",
                                   choices=("tprr", "predictor"))
    block_selection: str = param("adaptive", "v1: which blocks are pruned: adaptive (least importance lost) or "
                                             "uniform (every block at ratio ρ·β)", choices=("adaptive", "uniform"))
    token_choice: str = param("predictor", "v1: which tokens are recomputed: predictor, random or attention (ToCa's "
                                           "attention score)", choices=("predictor", "random", "attention"))
    seed: int = param(0, "seed of token_choice=random", min=0)

    def __post_init__(self):
        super().__post_init__()
        if self.version == 1 and self.i_steps == "predictor":
            raise ValueError("tokencache: i_steps=predictor needs version=2 (v1's predictor has no statistics "
                             "over samples)")

    def calibration_id(self) -> str:
        return self.name if self.version == 1 else f"{self.name}-v2"

    def setup(self, info):
        super().setup(info)
        T = info.num_steps
        default_k1, default_k2 = DEFAULT_INTERVALS["ddpm" if info.sampler_loop == "ddpm" else "ddim"]
        self.intervals = (default_k1 if self.k1 is None else self.k1, default_k2 if self.k2 is None else self.k2)
        if self.intervals[1] > self.intervals[0]:
            raise ValueError(f"tokencache: K2 = {self.intervals[1]} must not exceed K1 = {self.intervals[0]} "
                             "(phase 2 refreshes more often)")
        self.full = tprr_schedule(T, *self.intervals, self.phase_boundary)
        self.network = None
        if self.version == 2:
            self._setup_v2(info)
        else:
            self._setup_v1(info)
        self.needs_attention = self.token_choice == "attention" and any(
            0 < k < info.num_tokens for k in self.keep.values())
        self.full_attention = Compute(attention=True) if self.needs_attention else COMPUTE

    def _setup_v1(self, info):
        T, L, N = info.num_steps, info.block_count, info.num_tokens
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

    def _setup_v2(self, info):
        if self.token_choice != "predictor" or self.block_selection != "adaptive":
            raise ValueError("tokencache: version=2 chooses blocks and tokens by its predictor (leave token_choice "
                             "and block_selection at their defaults)")
        tensors = load_calibration(self, self.predictor, info.model, info.sampler_name)
        self.network = load_predictor_network(info.model, tensors)
        mean_alpha = tensors["mean_alpha"].float()
        if (self.i_steps or "predictor") == "predictor":
            self.full = percentile_steps(mean_alpha.mean(dim=(1, 2)), sum(self.full))
        ratio = self.cache_ratio * self.block_ratio if self.global_ratio is None else self.global_ratio
        self.keep = {(t, l): k for t in range(info.num_steps) if not self.full[t]
                     for l, k in enumerate(block_budget(mean_alpha[t], ratio))}
        self.tokens = {}

    def resolved(self):
        out = {**self.params(), "k1": self.intervals[0], "k2": self.intervals[1], "i_steps": self.i_steps or (
            "tprr" if self.version == 1 else "predictor"), "i_step_count": int(sum(self.full))}
        if self.version == 2:
            out["global_ratio"] = self.cache_ratio * self.block_ratio if self.global_ratio is None else self.global_ratio
            out["predictor_parameters"] = sum(p.numel() for p in self.network.parameters())
        return out

    def overhead_macs(self, shape):
        """``attention_scores`` as ToCa's (H·N² + N² + N per map); ``token_scores`` (a sort: no MACs);
        ``predictor`` (v2, one forward per row: a full transformer block on N tokens and the N·D·L head)."""
        from tokencache.metrics.flops import attention_branch_macs, block_fixed_macs, mlp_branch_macs

        n = shape.tokens
        block = attention_branch_macs(shape, n) + mlp_branch_macs(shape, n) + block_fixed_macs(shape, skip=False)
        return {"attention_scores": shape.heads * n * n + n * n + n, "token_scores": 0,
                "predictor": int(block + n * shape.hidden * shape.depth)}

    def block_action(self, step, block, inputs):
        if self.network is None or block != 0 or self.full[step]:
            return None
        alpha = self.network(inputs.x, inputs.c)  # (B, L, N): each sample's own scores
        self.count("predictor", 1)
        order = torch.argsort(alpha, dim=2, descending=True, stable=True)
        self.state.tokens = {l: order[:, l, :k] for l in range(self.info.block_count)
                             for k in [self.keep[step, l]] if 0 < k < self.info.num_tokens}
        return None

    def branch_action(self, step, block, branch):
        if self.full[step]:
            return self.full_attention if branch == "attn" else COMPUTE
        k = self.keep.get((step, block))
        if k is None or k >= self.info.num_tokens:
            return COMPUTE
        if k == 0:
            return REUSE
        if self.network is not None:
            return Subset(self.state.tokens[block])
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
