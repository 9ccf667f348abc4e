"""``toca``: ToCa, token-wise feature caching (Zou et al., ICLR 2025; Shenyi-Z/ToCa @ e84096ff, ``DiT-ToCa/``).

The official DiT code's rules, file:line at that commit (s = the respaced step index, counting
down from T−1 at the first step to 0, as ``current['step']`` there):

* **Full or ToCa, per block.** Every block re-tests ``s % I == 0`` (``models.py`` 132,
  ``cache_functions/cal_type.py`` 8–17); the first step is full. When block 0 runs full it
  resets the interval (``force_init.py`` 9–12 → ``force_scheduler.py`` 12–19):
  I = round(N / (1 + w − 2w·s/T)) in float32 (w = 0.4, round half to even), forced to 2 for
  s in [⌊0.2T⌋, ⌊0.4T⌋); w = 0 and no forcing when R = 0 (the code's FORA mode). Blocks 1…L−1
  of that same step re-test with the *new* I, and where it does not divide s they run as ToCa
  blocks. So a "full step" can be full in block 0 only (s = 245 and 155 at DDPM-250, s = 45
  and 32 at DDIM-50). A commented-out ``if layer == 27`` (``force_init.py`` 11) suggests this
  was not intended; it is what produced the published numbers, so it is the default
  (``per_block_retest=False`` decides once per step, from block 0).
* **Full block**: attention with its explicit softmax map, head-averaged (``attention.py``
  57–63), both branch outputs cached before their gates, the block's token counters reset
  (``models.py`` 148–159, ``force_init.py`` 8).
* **ToCa block**: the whole attention output is reused whatever the ratio schedule
  (``models.py`` 182–183); the MLP recomputes the top k tokens and reuses the rest
  (``models.py`` 185–190). k = ⌊clamp(R·layer·step·module, 0, 1)·N⌋ in float32
  (``cache_cutfresh.py`` 17–18, 24): ``ToCa-ddpm250`` step 1 + 0.4 − 0.8·s/T, layer
  1 + 0.8 − 1.6·l/27; ``ToCa-ddim50`` step 1 + 2 − 4·s/T, layer 1 − 0.2 + 0.4·l/27; module
  (MLP) 1 + 0.6·2.5 (``fresh_ratio_scheduler.py`` 40–73); ``constant``: R
  (``fresh_ratio_scheduler.py`` 12–13). The official /27 is DiT-XL's L − 1; we divide by L − 1.
* **Token score** (``score_evaluate.py`` 26–32, 64–70; ``scores.py`` 12): s1 = L2-normalised
  column sum of the block's last head-averaged attention map + 0.25·(steps since the token was
  last recomputed in this module)/N; then the best token of each 2×2 grid cell gets +0.6 × its
  score (``cache_cutfresh.py`` 21, 52–82); the top k by a descending sort are recomputed and
  their counters reset, every other counter + 1 (``cache_cutfresh.py`` 23–33).

What is ours: ties in the sort go to the lower token index (``argsort`` stable; the official
sort is not stable, and ties of float scores do not occur in practice); ``partial_attention=True``
recomputes attention tokens too, with the module factor 1 − 0.4·m — the paper's general form,
not the official DiT code. Overhead counters (per batch row): ``attention_scores`` — attention
maps reduced to s1 on full blocks; ``token_scores`` — tokens scored for a subset choice. The
explicit-softmax attention itself is the engine's ``explicit_attention``.
"""
from dataclasses import dataclass, field
from typing import Optional

import torch

from tokencache.baselines._force_fresh import refresh_interval
from tokencache.baselines._scores import (
    TOKEN_SCORE_MACS,
    attention_score,
    attention_score_macs,
    check_bonus_grid,
    choose_fresh_tokens,
)
from tokencache.cache import COMPUTE, REUSE, CacheMethod, Compute, param, register_method, sampling_steps

SCHEDULES = ("auto", "ToCa-ddpm250", "ToCa-ddim50", "constant")
#: (step weight, layer weight) of the official fresh-ratio schedulers.
SCHEDULE_WEIGHTS = {"ToCa-ddpm250": (0.4, 0.8), "ToCa-ddim50": (2.0, -0.2)}
MODULE_TIME_WEIGHT = 0.6  # official: share of a block's time spent in the MLP


def full_blocks(num_steps: int, num_blocks: int, interval: int, ratio: float, weight: float, sensitive: int,
                per_block_retest: bool = True) -> list[list[bool]]:
    """full[k][l]: whether block l runs in full at sampling step k (0 = first), by the force-fresh rules.

    Block 0 tests s % I == 0 and, when full, sets the new I; with ``per_block_retest`` (the
    official code) blocks 1…L−1 test the new I, otherwise they follow block 0.
    """
    plan, threshold = [], interval
    for step in sampling_steps(num_steps):
        s = step.countdown
        first = step.k == 0 or s % threshold == 0
        if first:
            threshold = refresh_interval(s, num_steps, interval, ratio, weight, sensitive)
        rest = first if not per_block_retest else (step.k == 0 or s % threshold == 0)
        plan.append([first] + [rest] * (num_blocks - 1))
    return plan


def fresh_tokens(schedule: str, ratio: float, s: int, num_steps: int, layer: int, layers: int, module: str,
                 module_weight: float, num_tokens: int) -> int:
    """k = ⌊clamp(R·layer·step·module, 0, 1)·N⌋, in the official float32 arithmetic and operation order."""
    if schedule == "constant":
        value = ratio
    else:
        step_w, layer_w = SCHEDULE_WEIGHTS[schedule]
        step_factor = 1 + step_w - 2 * step_w * s / num_steps
        layer_factor = 1 + layer_w - 2 * layer_w * layer / (layers - 1) if layers > 1 else 1 + layer_w
        if module == "attn":
            module_factor = 1 - (1 - MODULE_TIME_WEIGHT) * module_weight
        else:
            module_factor = 1 + MODULE_TIME_WEIGHT * module_weight
        value = ratio * layer_factor * step_factor * module_factor
    return int(torch.clamp(torch.tensor(value), 0.0, 1.0) * num_tokens)


@dataclass(frozen=True)
class ToCaPlan:
    """What setup derives: the interval and schedule for the sampler, which blocks run in full, the tokens."""

    interval: int  # N resolved for the sampler
    schedule: str  # the fresh-ratio schedule resolved for the sampler
    full: list  # full[k][l]: block l runs in full at step k
    tokens: dict  # (k, l) → {"attn": k_attn, "mlp": k_mlp}: tokens recomputed where the block is not full
    needs_scores: bool  # some branch recomputes a strict subset: attention maps are needed
    full_attention: Compute  # the action of a full block's attention (with its map when scores are needed)


@dataclass
class ToCaState:
    """Per generation: each block's s1 from its last full computation, each (block, module)'s counters."""

    scores: dict = field(default_factory=dict)  # block → s1 (B, N)
    stale: dict = field(default_factory=dict)  # (block, module) → steps since each token's last recompute (B, N)


@register_method
@dataclass
class ToCa(CacheMethod):
    """ToCa: blocks full on the force-fresh schedule (re-tested per block); elsewhere attention reused and the MLP's top-scored tokens recomputed."""

    name = "toca"
    State = ToCaState
    noop = {"interval": 1, "interval_weight": 0.0, "sensitive_interval": 1}
    search_space = {"interval": (2, 3, 4, 5), "fresh_ratio": (0.05, 0.1, 0.2, 0.3)}  # N × R; official 3–4 × 0.07
    variants = ({"per_block_retest": False}, {"partial_attention": True, "schedule": "constant", "fresh_ratio": 0.3})
    interval: Optional[int] = param(None, "N: base full-step interval (fresh_threshold); None = official for the "
                                          "sampler: 4 for DDPM, 3 for DDIM", min=1)
    fresh_ratio: float = param(0.07, "R: base fraction of tokens recomputed on ToCa steps (official 0.07)",
                               min=0.0, max=1.0)
    schedule: str = param("auto", "fresh-ratio schedule; auto = ToCa-ddpm250 for DDPM, ToCa-ddim50 for DDIM",
                          choices=SCHEDULES)
    soft_fresh_weight: float = param(0.25, "s3 weight: + weight·(steps since last recompute)/N", min=0.0)
    spatial_bonus: float = param(0.6, "s4: the best token of each 2×2 cell gets + bonus × its score", min=0.0)
    interval_weight: float = param(0.4, "w in the full-step interval round(N / (1 + w − 2w·s/T))", min=0.0, max=0.9)
    sensitive_interval: int = param(2, "full-step interval forced for s in [0.2T, 0.4T) when R > 0", min=1)
    module_weight: float = param(2.5, "m: MLP factor 1 + 0.6m (and attention 1 − 0.4m with partial_attention)",
                                 min=0.0, max=2.5)
    per_block_retest: bool = param(True, "official: blocks 1…L−1 re-test the interval block 0 just reset; "
                                         "False: one decision per step")
    partial_attention: bool = param(False, "not official for DiT: also recompute top attention tokens (factor "
                                           "1 − 0.4m) instead of reusing the whole attention output")

    def plan_for(self, info):
        ddpm = info.sampler_loop == "ddpm"
        interval = self.interval or (4 if ddpm else 3)
        schedule = self.schedule if self.schedule != "auto" else ("ToCa-ddpm250" if ddpm else "ToCa-ddim50")
        T, L, N = info.num_steps, info.block_count, info.num_tokens
        full = full_blocks(T, L, interval, self.fresh_ratio, self.interval_weight, self.sensitive_interval,
                           self.per_block_retest)
        modules = ("attn", "mlp") if self.partial_attention else ("mlp",)
        tokens = {(step.k, layer): {m: (fresh_tokens(schedule, self.fresh_ratio, step.countdown, T, layer, L, m,
                                                     self.module_weight, N) if m in modules else 0)
                                    for m in ("attn", "mlp")}
                  for step in info.steps for layer in range(L) if not full[step][layer]}
        needs_scores = any(0 < n < N for row in tokens.values() for n in row.values())
        if needs_scores:
            check_bonus_grid(self.name, self.spatial_bonus, info.grid_size)
        return ToCaPlan(interval, schedule, full, tokens, needs_scores,
                        Compute(attention=True) if needs_scores else COMPUTE)

    def resolved(self):
        if self.plan is None:
            return self.params()
        return {**self.params(), "interval": self.plan.interval, "schedule": self.plan.schedule}

    def overhead_macs(self, shape):
        """``attention_scores`` (one map reduced to s1); ``token_scores`` (one token scored) — see ``_scores``."""
        return {"attention_scores": attention_score_macs(shape), "token_scores": TOKEN_SCORE_MACS}

    def branch_action(self, step, block, branch):
        key, state, plan = (block, branch), self.state, self.plan
        if plan.full[step][block]:
            state.stale.pop(key, None)  # every token fresh: counters at 0
            return plan.full_attention if branch == "attn" else COMPUTE
        k = plan.tokens[step, block][branch]
        if k >= self.info.num_tokens:
            state.stale.pop(key, None)
            return COMPUTE
        if not plan.needs_scores or (branch == "attn" and not self.partial_attention):
            return REUSE  # the official code cuts (and counts) only the MLP's tokens
        action = choose_fresh_tokens(state.stale, key, state.scores[block], k, plan.interval, self.soft_fresh_weight,
                                     self.spatial_bonus, self.info.grid_size)
        if action is not REUSE:
            self.count("token_scores", self.info.num_tokens)
        return action

    def observe(self, step, block, branch, *, x, output, attention, rows):
        if attention is not None:
            self.state.scores[block] = attention_score(attention)
            self.count("attention_scores", 1)
