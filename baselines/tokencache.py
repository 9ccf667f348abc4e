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

**The later version (v2, ``version=2``)** — an input-dependent predictor, per-block ratios from one
global ratio and I-steps from its statistics, all ours — is described and implemented in the helper
module ``_tokencache_v2.py``; the parameters, the plan and the hooks below serve both versions.

Overhead counters: ``attention_scores`` (attention token choice: maps reduced on I-steps),
``token_scores`` (its per-P-step sort of N scores) and ``predictor`` (one v2 predictor forward
per row; a transformer block and a head, which a trace of the model sees).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from tokencache.baselines import _tokencache_v2 as v2
from tokencache.baselines._scores import attention_score, attention_score_macs, top_tokens
from tokencache.baselines._tokencache_predictor import CachePredictor, importance
from tokencache.cache import COMPUTE, REUSE, CacheMethod, Compute, Subset, load_calibration, param, register_method

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


# ---------------------------------------------------------------------- the method


@dataclass(frozen=True)
class TokenCachePlan:
    """What setup derives: the schedule, the tokens each pruned (P-step, block) recomputes, and how they are chosen."""

    intervals: tuple  # (K1, K2) resolved for the sampler
    full: list  # full[k]: step k is an I-step
    keep: dict  # (k, l) → tokens block l recomputes on P-step k (absent: the block runs in full)
    tokens: dict  # v1 predictor/random choice: (k, l) → (1, keep) token indices on the model's device
    network: Any  # v2: the input-dependent predictor (None for v1)
    full_attention: Compute  # the action of an I-step's attention (with its map for token_choice=attention)


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
    # ρ × β × (K1, K2) with K2 ≤ K1, around the testbed-chosen defaults (ρ 0.75, β 0.5, DDIM 3/2)
    search_space = {"cache_ratio": (0.5, 0.75, 0.9), "block_ratio": (0.5, 0.75, 1.0),
                    ("k1", "k2"): ((2, 2), (3, 2), (4, 2))}
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
    last_blocks: int = param(0, "v2 K: the last K blocks are never cached (compute every token on P-steps; "
                                "value unpublished, 0 = all blocks may be cached)", min=0)

    def __post_init__(self):
        super().__post_init__()
        if self.version == 1 and self.last_blocks:
            raise ValueError("tokencache: last_blocks is a version=2 option (v1 chooses its pruned blocks adaptively)")
        if self.version == 1 and self.i_steps == "predictor":
            raise ValueError("tokencache: i_steps=predictor needs version=2 (v1's predictor has no statistics "
                             "over samples)")

    def calibration_id(self) -> str:
        return self.name if self.version == 1 else f"{self.name}-v2"

    def plan_for(self, info):
        default_k1, default_k2 = DEFAULT_INTERVALS["ddpm" if info.sampler_loop == "ddpm" else "ddim"]
        intervals = (default_k1 if self.k1 is None else self.k1, default_k2 if self.k2 is None else self.k2)
        if intervals[1] > intervals[0]:
            raise ValueError(f"tokencache: K2 = {intervals[1]} must not exceed K1 = {intervals[0]} "
                             "(phase 2 refreshes more often)")
        full = tprr_schedule(info.num_steps, *intervals, self.phase_boundary)
        network, tokens = None, {}
        if self.version == 2:
            if self.token_choice != "predictor" or self.block_selection != "adaptive":
                raise ValueError("tokencache: version=2 chooses blocks and tokens by its predictor (leave "
                                 "token_choice and block_selection at their defaults)")
            tensors = load_calibration(self, self.predictor, info.model, info.sampler_name)
            network, full, keep = v2.plan(info, tensors, full, self.i_steps, self.reused_share(), self.last_blocks)
        else:
            keep, tokens = self._plan_v1(info, full)
        needs_attention = self.token_choice == "attention" and any(0 < k < info.num_tokens for k in keep.values())
        return TokenCachePlan(intervals, full, keep, tokens, network,
                              Compute(attention=True) if needs_attention else COMPUTE)

    def _plan_v1(self, info, full):
        """(keep, tokens): adaptive or uniform pruned blocks; the predictor's or random tokens, fixed per run."""
        T, L, N = info.num_steps, info.block_count, info.num_tokens
        needs_predictor = self.token_choice == "predictor" or self.block_selection == "adaptive"
        if needs_predictor and not self.predictor:
            raise ValueError("tokencache: set predictor=PATH (make one with `tokencache calibrate --method tokencache`), "
                             "or use token_choice=random|attention with block_selection=uniform")
        w = importance(load_calibration(self, self.predictor, info.model, info.sampler_name)) if needs_predictor else None
        if self.block_selection == "adaptive":
            k = N - round(self.cache_ratio * N)
            pruned = round(self.block_ratio * L)
            keep = {(t, l): k for t in range(T) if not full[t] for l in adaptive_blocks(w[t], pruned, k)}
        else:
            k = N - round(self.cache_ratio * self.block_ratio * N)
            keep = {(t, l): k for t in range(T) if not full[t] for l in range(L)}
        tokens = {}
        if self.token_choice in ("predictor", "random"):
            generator = torch.Generator().manual_seed(self.seed)
            chosen = {}
            for (t, l), k in sorted(keep.items()):
                if 0 < k < N:
                    if self.token_choice == "predictor":
                        chosen[t, l] = torch.argsort(w[t, l], descending=True, stable=True)[:k]
                    else:
                        chosen[t, l] = torch.randperm(N, generator=generator)[:k]
            if chosen:  # one host→device copy for the whole schedule
                stacked = torch.cat(list(chosen.values())).to(info.device or "cpu")
                for key, part in zip(chosen, torch.split(stacked, [len(v) for v in chosen.values()])):
                    tokens[key] = part.unsqueeze(0)
        return keep, tokens

    def reused_share(self) -> float:
        """v2's global ratio r: ``global_ratio``, or ρ·β (the share v1 reuses)."""
        return self.cache_ratio * self.block_ratio if self.global_ratio is None else self.global_ratio

    def resolved(self):
        plan = self.plan
        if plan is None:
            return self.params()
        out = {**self.params(), "k1": plan.intervals[0], "k2": plan.intervals[1], "i_steps": self.i_steps or (
            "tprr" if self.version == 1 else "predictor"), "i_step_count": int(sum(plan.full))}
        if self.version == 2:
            out["global_ratio"] = self.reused_share()
            out["predictor_parameters"] = sum(p.numel() for p in plan.network.parameters())
        return out

    def overhead_macs(self, shape):
        """``attention_scores`` as ToCa's (``_scores``); ``token_scores`` (a sort: no MACs); ``predictor``
        (v2, one forward per row, ``_tokencache_v2.predictor_macs``)."""
        return {"attention_scores": attention_score_macs(shape), "token_scores": 0,
                "predictor": v2.predictor_macs(shape)}

    def block_action(self, step, block, inputs):
        plan = self.plan
        if plan.network is None or block != 0 or plan.full[step]:
            return None
        alpha = plan.network(inputs.x, inputs.c)  # (B, L, N): each sample's own scores
        self.count("predictor", 1)
        order = torch.argsort(alpha, dim=2, descending=True, stable=True)
        self.state.tokens = {l: order[:, l, :k] for l in range(self.info.block_count)
                             for k in [plan.keep[step, l]] if 0 < k < self.info.num_tokens}
        return None

    def branch_action(self, step, block, branch):
        plan = self.plan
        if plan.full[step]:
            return plan.full_attention if branch == "attn" else COMPUTE
        k = plan.keep.get((step, block))
        if k is None or k >= self.info.num_tokens:
            return COMPUTE
        if k == 0:
            return REUSE
        if plan.network is not None:
            return Subset(self.state.tokens[block])
        if self.token_choice == "attention":
            if branch == "attn":  # one choice per block and step, shared by its MLP
                self.state.chosen = top_tokens(self.state.scores[block], k)
                self.count("token_scores", self.info.num_tokens)
            return Subset(self.state.chosen)
        return Subset(plan.tokens[step, block])

    def observe(self, step, block, branch, *, x, output, attention, rows):
        if attention is not None:
            self.state.scores[block] = attention_score(attention)
            self.count("attention_scores", 1)
