"""``tokencache``: TokenCache (Lou et al., arXiv 2409.18523) — the method this suite is named for.

On an **I-step** (independent step) every block runs in full and its branch outputs are cached.
On a **P-step** the pruned blocks recompute only their k most important tokens — queries from
those tokens, keys and values from all tokens, the MLP on those tokens — and reuse the cached
update of the other N − k, k = N − round(ρ·N); the other blocks run in full.

* **Token choice** (which k): by the Cache Predictor's w[t, l] (:mod:`.predictor`, the paper's
  method); ``random`` (a seeded permutation per step and block); or ``attention`` (ToCa's s1:
  the column sum of the head-averaged attention map of the block's last I-step) — the
  ablation's three variants.
* **Adaptive block selection**: on each P-step t the round(β·L) blocks pruned are those whose
  pruning changes the output least by the predictor, i.e. the smallest Σ w[t, l, n] over the
  N − k tokens the block would reuse (the importance the relaxed network would lose). The
  ablation's ``uniform`` prunes every block with ratio ρ·β instead: the same tokens saved,
  spread evenly.
* **Two-Phase Round-Robin** (:func:`tprr_schedule`): an I-step first and after every K P-steps,
  K = K1 during the first ``phase_boundary`` of the steps and K2 < K1 after (early, noisy steps
  are more alike); K2 = K1 is the ablation's single fixed interval. Defaults per sampler, chosen
  by the ablation on the digits testbed (README, "TokenCache defaults").

The predictor's top-k order is fixed per (t, l) when the method is set up, so choosing tokens
costs nothing while sampling (no scores, no sort, no host synchronisation). Overhead counters:
``attention_scores`` (attention token choice: maps reduced on I-steps, as ToCa's) and
``token_scores`` (its per-P-step sort of N scores).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from tokencache.cache.actions import COMPUTE, REUSE, Compute, Subset
from tokencache.cache.methods import CacheMethod, param, register_method
from tokencache.cache.predictor import importance, load_predictor

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


@register_method
@dataclass
class TokenCache(CacheMethod):
    """TokenCache: Two-Phase Round-Robin I-steps; on P-steps the adaptively chosen blocks recompute only the predictor's top tokens."""

    name = "tokencache"
    predictor: Optional[str] = param(None, "g_θ: Cache Predictor .pt from `tokencache train-predictor` (needed for "
                                           "token_choice=predictor or block_selection=adaptive)")
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
            raise ValueError("tokencache: set predictor=PATH (train one with `tokencache train-predictor`), or use "
                             "token_choice=random|attention with block_selection=uniform")
        w = importance(load_predictor(self.predictor, info.model, info.sampler_name)) if needs_predictor else None
        device = next(info.model.parameters()).device if info.model is not None else torch.device("cpu")
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
                stacked = torch.cat(list(chosen.values())).to(device)
                for key, part in zip(chosen, torch.split(stacked, [len(v) for v in chosen.values()])):
                    self.tokens[key] = part.unsqueeze(0)
        self.needs_attention = self.token_choice == "attention" and any(0 < k < N for k in self.keep.values())
        self.full_attention = Compute(attention=True) if self.needs_attention else COMPUTE

    def reset(self):
        self.scores = {}  # block → attention score (B, N) of its last I-step (token_choice=attention)

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
                self.chosen = torch.argsort(self.scores[block], dim=1, descending=True, stable=True)[:, :k]
                self.count("token_scores", self.info.num_tokens)
            return Subset(self.chosen)
        return Subset(self.tokens[step, block])

    def observe(self, step, block, branch, *, x, output, attention):
        if attention is not None:
            self.scores[block] = F.normalize(attention.mean(dim=1).sum(dim=1), dim=1, p=2)
            self.count("attention_scores", 1)
