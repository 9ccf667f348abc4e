"""``fbcache``: First-Block Cache (diffusers ``FirstBlockCacheConfig``; cache-dit FBCache = DBCache F1B0).

**Sources**, ``path:line`` at these commits:

* diffusers, huggingface/diffusers @ 58eb52c0803ea9af3abec60841c2a093bdf1f951 (the file last changed at
  2843b3d3), ``src/diffusers/hooks/first_block_cache.py`` — the default semantics;
* cache-dit, vipshop/cache-dit @ f86744af7daa0f569fe4324e73e3e50cebf70f4c, ``src/cache_dit/caching/`` —
  the options (``cache_contexts/cache_config.py``, ``cache_contexts/cache_manager.py``,
  ``cache_contexts/cache_context.py``, ``cache_blocks/pattern_base.py``);
* origin: chengzeyi/ParaAttention @ 4de137c5 (linked from first_block_cache.py:196), the same rule as
  cache-dit's (``src/para_attn/first_block_cache/utils.py`` 221–234).

**The rule (diffusers).** Every step runs block 0 and takes its residual r₀ = out₀ − in₀
(first_block_cache.py:79–87). The first call, with no reference yet, computes everything
(:136–137). Otherwise d = mean|r₀ − r₀ʳᵉᶠ| / mean|r₀ʳᵉᶠ|, a float32 ratio read with ``.item()``,
and the remaining blocks run iff ``d > τ`` (:138–142). On a computed step the reference r₀ʳᵉᶠ and
block 0's output are stored (:117–125) and the last block stores the tail residual
out_{L−1} − out₀ (:167–181); so the reference is block 0's residual at the **last computed
step**, not at the previous step. On a skipped step the blocks after block 0 pass their input
through (:183–190) and the output is out₀ + the stored tail residual (:94–101). Here that is
``Span(1, L−1, reuse=…)`` with ``keep="residual"``: the engine re-adds the residual of blocks
1…L−1 to block 1's input, which is block 0's current output — exactly diffusers' sum. τ = 0.05
(:48). State starts afresh per generation (``StateManager.reset``, hooks.py:52–56).

**cache-dit's options** (named parameters; their defaults reproduce diffusers), in the order of
``can_cache`` (cache_manager.py:863–956):

* ``max_warmup_steps`` / ``warmup_interval``: no reuse at steps ``range(0, max_warmup_steps,
  warmup_interval)`` (cache_context.py:319–346; cache-dit's default 8/1, cache_config.py:47–51; its
  comment says "less than or equal", the code is strict);
* ``max_cached_steps``: no reuse once a sample has reused that many steps (cache_manager.py:883–893,
  default −1 = no limit, cache_config.py:55);
* ``max_continuous_cached_steps``: no reuse when the continuous-reuse counter reaches the limit, which
  then resets to 0 (cache_manager.py:896–914). The counter is cache-dit's (``add_cached_step``,
  cache_context.py:249–263): +1 for the first reuse ever, and for a reuse right after a reused step
  +2 if the counter is 0 else +1; a computed step does not reset it. ``continuous_counter="run-length"``
  counts the true run of consecutive reused steps instead (reset on every computed step);
* ``max_accumulated_diff``: no reuse once the sum of the positive d measured so far reaches it
  (cache_manager.py:917–930; summed on computed steps too, cache_context.py:220–235);
* ``rule="cache-dit"``: reuse iff ``d < τ`` (cache_manager.py:626, ParaAttention utils.py:234), with
  τ ≤ 0 never and τ ≥ 1 always reusing without measuring d (cache_manager.py:564–571, 932–935); the
  two rules differ only at d = τ and at those τ;
* ``fn_compute_blocks`` F_n, ``bn_compute_blocks`` B_n (DBCache, cache_config.py:28–33; F1B0 is
  FBCache): the signal is the residual of the first F_n blocks, in_{F_n} − in₀ (pattern_base.py:
  223–233), the span F_n…L−1−B_n is reused through its residual (:280–301, apply_cache
  cache_manager.py:815–854) and the last B_n blocks always run (:261–266, 316–321).

Not exposed (off by default in cache-dit): ``steps_computation_mask`` (a fixed schedule),
``important_condition_threshold`` (token-selected d), ``downsample_factor``, the hidden-states
L1 diff, separate CFG calls (``cfg="separate"`` gives each CFG half its own decision instead).

**What is ours.**

* Per sample instead of per batch: the official d is one scalar over the whole batch tensor (for a
  batch of one sample with CFG: both its rows). Here each sample decides alone, d taken over its
  own rows (conditional and null-label row together; ``cfg="separate"``: each row alone, as
  diffusers' Flux pipeline with separate cond/uncond contexts); the arithmetic is otherwise the
  official one: float32 means, the ratio compared in float64 as the Python float ``.item()``
  gives. Every counter of the options above is per sample and starts afresh with each generation
  (cache-dit clears its cached-step list at a context's first step but keeps the continuous and
  accumulated counters, cache_context.py:170–176).
* The blocks are the model's transformer blocks in execution order (MDTv2's encoder in/out and
  decoder blocks; diffusers finds none of them by name, first_block_cache.py:229–233). On MDTv2 the
  reused span also carries the long skips and the decoder position embedding; a B_n that would
  cut a long skip is refused.
* Diagnostics: ``state.history`` holds, per step, d per row (None at the first step, NaN for rows
  that an earlier check sent to compute) and the reuse mask.

Overhead counters (per batch row): ``residual_values`` — values of the signal residual
in_{F_n} − in₀ (1 MAC-equivalent each, every step); ``signal_values`` — values compared (the
difference and two absolute sums, 3 each). Both are elementwise (fvcore counts none of them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from tokencache.baselines._scores import RELATIVE_L1_MACS, relative_l1
from tokencache.cache import CacheMethod, Span, param, register_method, sample_view

RULES = ("diffusers", "cache-dit")
CFG_MODES = ("together", "separate")
COUNTERS = ("cache-dit", "run-length")


@dataclass(frozen=True)
class FBPlan:
    span: tuple  # (F_n, L−1−B_n): the blocks reused through their residual
    warmup: frozenset  # steps k that never reuse (cache-dit's warm-up)


@dataclass
class FBState:
    block0_input: Optional[torch.Tensor] = None  # in₀ (B, N, D) at this step
    reference: Optional[torch.Tensor] = None  # (S, r·N·D): the signal residual at each sample's last computed step
    cached_steps: Optional[torch.Tensor] = None  # (S,) int64: steps reused so far
    continuous: Optional[torch.Tensor] = None  # (S,) int64: the continuous-reuse counter
    last_cached: Optional[torch.Tensor] = None  # (S,) int64: last reused step, −1 before any
    accumulated: Optional[torch.Tensor] = None  # (S,) float64: sum of the positive d measured
    history: list = field(default_factory=list)  # per step: {"step", "diff" (B,) float64 or None, "reuse" (B,)}


@register_method
@dataclass
class FirstBlockCache(CacheMethod):
    """Run the first block(s); samples whose first-block residual changed little reuse the rest's residual."""

    name = "fbcache"
    host_sync = True
    State = FBState
    noop = {"max_cached_steps": 0}
    search_space = {"threshold": (0.05, 0.1, 0.2, 0.4, 0.6)}  # τ; diffusers 0.05, cache-dit 0.08
    threshold: float = param(0.05, "τ: relative L1 change of the first-block residual (diffusers 0.05; cache-dit "
                                   "0.08)", min=0.0)
    rule: str = param("diffusers", "comparison: diffusers computes iff d > τ; cache-dit reuses iff d < τ (and "
                                   "always at τ ≥ 1)", choices=RULES)
    fn_compute_blocks: int = param(1, "F_n: blocks always run first, whose residual is the signal (FBCache 1; "
                                      "cache-dit DBCache 8)", min=1)
    bn_compute_blocks: int = param(0, "B_n: last blocks always run (FBCache 0)", min=0)
    max_warmup_steps: int = param(0, "no reuse at steps range(0, this, warmup_interval) (diffusers 0; cache-dit 8)",
                                  min=0)
    warmup_interval: int = param(1, "step interval of the warm-up (cache-dit 1)", min=1)
    max_cached_steps: int = param(-1, "no reuse once a sample reused this many steps (−1: no limit)", min=-1)
    max_continuous_cached_steps: int = param(-1, "no reuse when the continuous-reuse counter reaches this (−1: no "
                                                 "limit)", min=-1)
    continuous_counter: str = param("cache-dit", "continuous-reuse counter: cache-dit's (not reset by a computed "
                                                 "step) or the true run length", choices=COUNTERS)
    max_accumulated_diff: Optional[float] = param(None, "no reuse once the summed positive d reaches this (None: "
                                                        "off)", min=0.0)
    cfg: str = param("together", "with CFG batching: one decision from both rows of a sample, or one per row",
                     choices=CFG_MODES)

    def plan_for(self, info):
        last = info.block_count - 1 - self.bn_compute_blocks
        if self.fn_compute_blocks > last:
            raise ValueError(f"fbcache: F_n = {self.fn_compute_blocks} and B_n = {self.bn_compute_blocks} leave no "
                             f"block to reuse in a model of {info.block_count} blocks")
        for push, pop in info.skip_partners.items():
            if self.fn_compute_blocks <= push <= last < pop:
                raise ValueError(f"fbcache: B_n = {self.bn_compute_blocks} runs block {pop}, whose long skip comes "
                                 f"from block {push} inside the reused span {self.fn_compute_blocks}…{last}")
        return FBPlan((self.fn_compute_blocks, last), frozenset(range(0, self.max_warmup_steps, self.warmup_interval)))

    def resolved(self):
        if self.plan is None:
            return self.params()
        return {**self.params(), "reused_span": list(self.plan.span)}

    def overhead_macs(self, shape):
        return {"residual_values": 1, "signal_values": RELATIVE_L1_MACS}

    def block_action(self, step, block, inputs):
        if block == 0:
            self.state.block0_input = inputs.x
        span = self.plan.span
        if block != span[0]:
            return None
        state = self.state
        rows = inputs.rows_per_sample if self.cfg == "together" else 1
        residual = sample_view(inputs.x - state.block0_input, rows)
        per_row = residual.shape[1] // rows
        self.count("residual_values", per_row)
        samples = residual.shape[0]
        device = residual.device
        if state.reference is None:  # the first call: compute (first_block_cache.py:136–137)
            state.reference = residual
            state.cached_steps = torch.zeros(samples, dtype=torch.int64, device=device)
            state.continuous = torch.zeros(samples, dtype=torch.int64, device=device)
            state.last_cached = torch.full((samples,), -1, dtype=torch.int64, device=device)
            state.accumulated = torch.zeros(samples, dtype=torch.float64, device=device)
            reuse = torch.zeros(samples, dtype=torch.bool, device=device)
            state.history.append({"step": step, "diff": None, "reuse": reuse.repeat(rows)})
            return Span(*span, reuse=reuse.repeat(rows))
        reuse, diff = self._decide(step, residual, samples, device)
        if diff is not None:
            self.count("signal_values", per_row)
        self._count_reuse(step, reuse)
        state.reference = torch.where(reuse.view(-1, 1), state.reference, residual)
        state.history.append({"step": step, "diff": None if diff is None else diff.repeat(rows),
                              "reuse": reuse.repeat(rows)})
        return Span(*span, reuse=reuse.repeat(rows))

    def _decide(self, step, residual, samples, device):
        """(reuse (S,), d (S,) float64 or None): cache-dit's can_cache checks in order, then the rule."""
        state = self.state
        can = (torch.zeros if step in self.plan.warmup else torch.ones)(samples, dtype=torch.bool, device=device)
        if self.max_cached_steps >= 0:
            can = can & (state.cached_steps < self.max_cached_steps)
        if self.max_continuous_cached_steps >= 0:
            hit = can & (state.continuous >= self.max_continuous_cached_steps)
            state.continuous = torch.where(hit, torch.zeros_like(state.continuous), state.continuous)
            can = can & ~hit
        if self.max_accumulated_diff is not None and self.max_accumulated_diff > 0:
            can = can & (state.accumulated < self.max_accumulated_diff)
        if self.rule == "cache-dit" and (self.threshold <= 0 or self.threshold >= 1):
            return can & (self.threshold >= 1), None
        diff = relative_l1(residual, state.reference).double()  # .item() of the float32 ratio
        if self.rule == "diffusers":
            similar = ~(diff > self.threshold)
        else:
            similar = diff < self.threshold
        state.accumulated = state.accumulated + torch.where(can & (diff > 0), diff, torch.zeros_like(diff))
        return can & similar, torch.where(can, diff, torch.full_like(diff, float("nan")))

    def _count_reuse(self, step, reuse):
        """``add_cached_step`` (cache_context.py:249–263) for the samples that reuse."""
        state = self.state
        if self.continuous_counter == "cache-dit":
            before = state.last_cached >= 0
            consecutive = before & (state.last_cached == step - 1)
            step_up = torch.where(state.continuous == 0, 2, 1)
            increment = torch.where(before, torch.where(consecutive, step_up, 0), 1)
            state.continuous = torch.where(reuse, state.continuous + increment, state.continuous)
        else:
            state.continuous = torch.where(reuse, state.continuous + 1, torch.zeros_like(state.continuous))
        state.last_cached = torch.where(reuse, torch.full_like(state.last_cached, step), state.last_cached)
        state.cached_steps = state.cached_steps + reuse.to(torch.int64)
