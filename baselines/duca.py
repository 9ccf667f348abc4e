"""``duca``: DuCa, dual feature caching (Zou et al., arXiv 2412.18911; Shenyi-Z/DuCa @
0a7151b7bfea3822295e8d29f26cd2e10756670c, ``DuCa-DiT/``).

The official DiT code's rules, file:line at that commit (paths under ``DuCa-DiT/``; s = the
respaced step index ``current['step']``, counting down from T−1 at the first step to 0,
``diffusion/gaussian_diffusion.py`` 508/513 and 688/693; ``cache_init`` once per loop):

* **Type per (step, block).** ``cal_type`` runs at the start of *every block* (``models.py``
  194; ``cache_functions/cal_type.py`` 6–21): the interval I is ``fresh_threshold`` (N) at the
  first step, else ``cal_threshold``; r = s mod I: r == 0 or the first step → **full**, r odd →
  **ToCa** (conservative), r even (≠ 0) → **aggressive**. After a full step at s this runs
  r = I−1, I−2, …: with I = 3 aggressive then ToCa, with I = 4 ToCa, aggressive, ToCa.
* **Interval refresh, re-tested per block.** Every full block calls ``force_init`` after its
  attention and after its MLP (``models.py`` 222, 229), which calls ``force_scheduler``
  unconditionally (``force_init.py`` 9; ToCa only for layer 0): I = torch.round(N /
  torch.tensor(1 + w − 2w·s/T)) in float32 (w = 0.4; 0 when R = 0), forced to 2 for s in
  range(⌊0.2T⌋, ⌊0.4T⌋) when R ≠ 0 (``force_scheduler.py`` 6–19). The next block's ``cal_type``
  reads the new I, so a step whose block 0 is full under the old I can run blocks 1…L−1 as ToCa
  or aggressive under the new one: at DDIM-50, N = 3: s = 45 (block 0 full, the rest ToCa) and
  s = 32 (block 0 full, the rest aggressive: block 0's work only refreshes its caches). This is
  what the official code runs, so it is the default (``per_block_retest=False``: one decision
  per step, from block 0).
* **Full block** (``models.py`` 200–230): adaLN with this step's c; attention on all tokens with
  the explicit softmax map (fused attention is off for ``cache_type='attention'``,
  ``attention.py`` 51–64), head-averaged and kept per layer (221); the attention and MLP outputs
  before their gates are cached (220, 228); the (layer, module) staleness counters set to 0
  (``force_init.py`` 8).
* **ToCa block** (``models.py`` 242–266): adaLN with this step's c; the whole cached attention
  output is reused with this step's gate (260); the MLP recomputes the top k tokens of x (after
  that residual) and scatters them into its cached output (263–266, ``update_cache.py`` 16–19).
  k = int(clamp(tensor(R·layer·step·module), 0, 1)·N) (``cache_cutfresh.py`` 17–18, 24); the
  official DiT scheduler ``'ToCa'`` (``fresh_ratio_scheduler.py`` 38–54): step 1 + 2 − 4·s/T,
  layer 1 − 0.2 + 0.4·l/27, MLP module 1 + 0.6·2.5 — 0 tokens for s ≥ 3T/4, more tokens in later
  layers. The other official schedulers (``constant``, ``linear``, ``exp``, ``linear-mode``,
  ``layerwise``, ``linear-layerwise``, 12–36) are choices.
* **Token score** (``cache_type='attention'``, ``force_fresh='global'``): s1 = L2-normalised
  column sum of the layer's last head-averaged map (``scores.py`` 11) + λ·(MLP counter)/N with
  the command-line N (``score_evaluate.py`` 64–70); then the best token of each 2×2 cell gets
  + 0.8 × its score (``cache_cutfresh.py`` 21, 52–82; ToCa's is 0.6); a descending argsort, the
  first k recomputed; every MLP counter + 1, the chosen ones 0 (``cache_cutfresh.py`` 23–33).
* **Aggressive block** (``models.py`` 345–348): nothing is computed (no adaLN either); blocks
  0…26 pass x through and block 27 replaces it by ``cache['noise']``, block 27's output from the
  last step that ran it (stored at 352–353 after every block 27). No cache or counter changes.

**kv-norm** (``cache_type='kv-norm'``, ``cache_functions/attention.py`` 44–47, ``scores.py``
25–32): every full attention keeps v_norm = ‖v_h‖₂ per head and token (the value heads, before
the q/k norms, which do not touch V), and s1 = L2-normalise over the tokens of Σ_h (1 − v_norm);
the rest of the score (λ, the 2×2 bonus) and every rule above are unchanged. In this mode the
official attention takes timm's fused path (``attention.py`` 51–56; no map is kept), as here.
Quirk kept: where Σ_h (1 − ‖v_h‖) is negative (mean head norm above 1) the 2×2 "bonus" adds
0.8 × a negative score and *lowers* the cell's best token.

Official DiT setting: DiT-XL/2 256², DDIM-50, cfg 1.5, N = 3, R = 0.05, scheduler ``ToCa``,
λ = 0.25, ``--cache-type attention --force-fresh global`` (``/README.md`` 82, 89). The README
publishes no DiT number (its 2.50× is OpenSora's, ``/README.md`` 14); the command-line defaults
are DDPM-250, N = 4, R = 0.07 (``sample.py`` 105–123). By the official FLOP counter's formula
the DDIM-50 plan costs 1/2.48 of the full model (our count; not published).

What is ours: the aggressive step is ``Span(start, L−1, reuse=True, keep="output")`` (the last
block's stored output whatever the input), and every step whose blocks run stores it with a
compute span ending at block L−1 — the official ``'noise'`` store, for any depth; the official
/27 of the layer factors is L − 1 and its 28 is L (``cache_init.py`` 13–20; ``models.py`` 347
hard-codes block 27), so the method runs on any DiT and on MDTv2 (the last block in execution
order). Ties in the sort go to the lower token index (stable argsort; the official sort is not
stable, and float ties do not occur in practice). ``cache_type='random'`` (the ``sample_ddp.py``
default, ``torch.rand`` shared by the two CFG halves through the global generator) is not
offered: a sample's tokens would depend on its batch. ``interval_weight``,
``sensitive_interval`` and ``module_weight`` expose the official constants 0.4, 2 and 2.5.
Overhead counters (per batch row): ``attention_scores`` — maps reduced to s1 on full blocks;
``token_scores`` — tokens scored for a subset choice (the explicit softmax itself is the
engine's ``explicit_attention``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from tokencache.baselines._force_fresh import refresh_interval
from tokencache.baselines._scores import (
    TOKEN_SCORE_MACS,
    attention_score,
    attention_score_macs,
    check_bonus_grid,
    choose_fresh_tokens,
)
from tokencache.cache import COMPUTE, REUSE, CacheMethod, Compute, Span, param, register_method, sampling_steps

#: the official ``fresh_ratio_scheduler.py`` names (``'cosine'``, accepted by the command line, raises there)
SCHEDULES = ("ToCa", "constant", "linear", "exp", "linear-mode", "layerwise", "linear-layerwise")
#: s1 sources (``sample.py`` 115; 'random' is not offered, see below; 'similarity', 'norm' and 'compress' are
#: listed there but have no score in ``scores.py``)
CACHE_TYPES = ("attention", "kv-norm")
MODULE_TIME_WEIGHT = 0.6  # fresh_ratio_scheduler.py 33, 51
SCHEDULE_WEIGHT = 0.9  # fresh_ratio_scheduler.py 11
MODE_WEIGHT = 0.1  # fresh_ratio_scheduler.py 21

FULL, TOCA, AGGRESSIVE = "full", "ToCa", "aggressive"


def value_norm_score(values: torch.Tensor) -> torch.Tensor:
    """kv-norm s1 (B, N): L2-normalised over the tokens of Σ_heads (1 − ‖v_h‖₂) (``scores.py`` 25–32).

    ``values`` (B, H, N, d): the block's value heads. Despite the name only V enters (the K line is
    commented out); a token with *small* value vectors scores high.
    """
    return F.normalize((1 - torch.norm(values, dim=-1, p=2)).sum(dim=-2), p=2)


def block_types(num_steps: int, num_blocks: int, interval: int, ratio: float, weight: float = 0.4,
                sensitive: int = 2, per_block_retest: bool = True) -> list[list[str]]:
    """types[k][l] in {"full", "ToCa", "aggressive"}: the official ``cal_type`` with the interval
    every full block resets (``per_block_retest``), or one decision per step from block 0."""
    plan, threshold = [], interval
    for step in sampling_steps(num_steps):
        s = step.countdown
        row = []
        for layer in range(num_blocks):
            if layer > 0 and not per_block_retest:
                row.append(row[0])
                continue
            r = s % threshold
            kind = FULL if step.k == 0 or r == 0 else (TOCA if r % 2 == 1 else AGGRESSIVE)
            if kind == FULL:
                threshold = refresh_interval(s, num_steps, interval, ratio, weight, sensitive)
            row.append(kind)
        plan.append(row)
    return plan


def scheduled_ratio(schedule: str, ratio: float, s: int, num_steps: int, layer: int, layers: int, interval: int,
                module_weight: float = 2.5) -> float:
    """The MLP's fresh ratio (a Python float, unclamped) of ``fresh_ratio_scheduler.py``, /27 → /(L − 1)."""
    last = layers - 1 if layers > 1 else 1
    w = SCHEDULE_WEIGHT
    if schedule == "constant":
        return ratio
    if schedule == "linear":
        return ratio * (1 + w - 2 * w * s / num_steps)
    if schedule == "exp":
        return ratio * (w ** (s / num_steps))
    if schedule == "linear-mode":
        mode = (s % interval) / interval - 0.5
        return ratio * (1 + w - 2 * w * s / num_steps + MODE_WEIGHT * mode)
    if schedule == "layerwise":
        return ratio * (1 + w - 2 * w * layer / last)
    step_weight, layer_weight = (0.4, 0.8) if schedule == "linear-layerwise" else (2.0, -0.2)
    step_factor = 1 + step_weight - 2 * step_weight * s / num_steps
    layer_factor = 1 + layer_weight - 2 * layer_weight * layer / last
    module_factor = 1 + MODULE_TIME_WEIGHT * module_weight
    return ratio * layer_factor * step_factor * module_factor


def fresh_count(value: float, num_tokens: int) -> int:
    """topk = int(clamp(tensor(ratio), 0, 1) · N): the float32 clamp and product, truncated."""
    return int(torch.clamp(torch.tensor(value), 0.0, 1.0) * num_tokens)


@dataclass(frozen=True)
class DuCaPlan:
    """What setup derives: each (step, block)'s type, the MLP tokens of the ToCa blocks, the aggressive spans."""

    types: list  # types[k][l] in FULL, TOCA, AGGRESSIVE
    tokens: dict  # (k, l) → MLP tokens recomputed by a ToCa block
    aggressive_from: list  # aggressive_from[k]: the first aggressive block of step k (all later ones too), or None
    needs_scores: bool  # some ToCa block recomputes a strict subset: attention maps are needed
    full_attention: Compute  # the action of a full block's attention (with its map when scores are needed)


@dataclass
class DuCaState:
    """Per generation: each block's s1 from its last full computation, each block's MLP counters."""

    scores: dict = field(default_factory=dict)  # block → s1 (B, N)
    stale: dict = field(default_factory=dict)  # block → steps since each MLP token's last recompute (B, N)


@register_method
@dataclass
class DuCa(CacheMethod):
    """DuCa: per block full, conservative (attention reused, the MLP's top-scored tokens recomputed) or aggressive (the last block's previous output)."""

    name = "duca"
    State = DuCaState
    noop = {"interval": 1, "interval_weight": 0.0, "sensitive_interval": 1}
    search_space = {"interval": (2, 3, 4, 5), "fresh_ratio": (0.05, 0.1, 0.2)}  # N × R; official 3 × 0.05
    interval: int = param(3, "N: base interval (fresh_threshold; official DiT setting 3)", min=1)
    fresh_ratio: float = param(0.05, "R: base fraction of MLP tokens recomputed on conservative blocks "
                                     "(official DiT setting 0.05)", min=0.0, max=1.0)
    schedule: str = param("ToCa", "fresh-ratio scheduler (official name; 'ToCa' = step 3 − 4s/T, layer "
                                  "0.8 + 0.4l/(L−1), MLP 2.5)", choices=SCHEDULES)
    soft_fresh_weight: float = param(0.25, "λ (s3): + λ·(steps since last recompute)/N", min=0.0)
    spatial_bonus: float = param(0.8, "s4: the best token of each 2×2 cell gets + bonus × its score (DuCa 0.8)",
                                 min=0.0)
    interval_weight: float = param(0.4, "w in the interval round(N / (1 + w − 2w·s/T))", min=0.0, max=0.9)
    sensitive_interval: int = param(2, "interval forced for s in [0.2T, 0.4T) when R > 0", min=1)
    module_weight: float = param(2.5, "m: the MLP's ratio factor 1 + 0.6m", min=0.0)
    cache_type: str = param("attention", "s1: attention (column sums of the explicit map; the official DiT "
                                         "setting) or kv-norm (Σ_heads (1 − ‖v‖) of the fused attention's values)",
                            choices=CACHE_TYPES)
    per_block_retest: bool = param(True, "official: every block re-tests the interval the full blocks reset; "
                                         "False: one decision per step")

    def plan_for(self, info):
        T, L, N = info.num_steps, info.block_count, info.num_tokens
        types = block_types(T, L, self.interval, self.fresh_ratio, self.interval_weight, self.sensitive_interval,
                            self.per_block_retest)
        tokens = {(step.k, layer): fresh_count(scheduled_ratio(self.schedule, self.fresh_ratio, step.countdown, T,
                                                               layer, L, self.interval, self.module_weight), N)
                  for step in info.steps for layer in range(L) if types[step][layer] == TOCA}
        # the first aggressive block of each step (all later blocks are aggressive too: only a full
        # block changes the interval), or None
        aggressive_from = [row.index(AGGRESSIVE) if AGGRESSIVE in row else None for row in types]
        needs_scores = any(0 < n < N for n in tokens.values())
        if needs_scores:
            check_bonus_grid(self.name, self.spatial_bonus, info.grid_size)
        scored = Compute(values=True) if self.cache_type == "kv-norm" else Compute(attention=True)
        return DuCaPlan(types, tokens, aggressive_from, needs_scores, scored if needs_scores else COMPUTE)

    def resolved(self):
        out = self.params()
        if self.plan is not None:
            flat = [t for row in self.plan.types for t in row]
            out["blocks"] = {kind: flat.count(kind) for kind in (FULL, TOCA, AGGRESSIVE)}
        return out

    def overhead_macs(self, shape):
        """``attention_scores`` (one map reduced to s1); ``value_scores`` (one block's values reduced to the
        kv-norm s1: the squared norms N·D, 1 − norm and the head sum 2·H·N, the L2 normalisation N);
        ``token_scores`` (one token scored) — see ``_scores``."""
        return {"attention_scores": attention_score_macs(shape), "token_scores": TOKEN_SCORE_MACS,
                "value_scores": shape.tokens * shape.hidden + 2 * shape.heads * shape.tokens + shape.tokens}

    def block_action(self, step, block, inputs):
        last = self.info.block_count - 1
        start = self.plan.aggressive_from[step]
        if block == 0 and start != 0:
            # the blocks run: keep block L−1's output for the aggressive steps (models.py 352–353);
            # a step whose later blocks are aggressive runs block 0 alone
            return Span(0, last, reuse=False, keep="output") if start is None else None
        if block == start:
            return Span(block, last, reuse=True, keep="output")  # models.py 345–348
        return None

    def branch_action(self, step, block, branch):
        state, plan = self.state, self.plan
        kind = plan.types[step][block]
        if kind == FULL:
            if branch == "mlp":
                state.stale.pop(block, None)  # every counter 0
                return COMPUTE
            return plan.full_attention
        if kind != TOCA:
            raise RuntimeError(f"duca: block {block} at step {step} is aggressive and must not run")
        if branch == "attn":
            return REUSE
        k = plan.tokens[step, block]
        if k >= self.info.num_tokens:
            state.stale.pop(block, None)
            return COMPUTE
        if not plan.needs_scores:
            return REUSE
        action = choose_fresh_tokens(state.stale, block, state.scores[block], k, self.interval, self.soft_fresh_weight,
                                     self.spatial_bonus, self.info.grid_size)
        if action is not REUSE:
            self.count("token_scores", self.info.num_tokens)
        return action

    def observe(self, step, block, branch, *, x, output, attention, rows, values=None):
        if attention is not None:
            self.state.scores[block] = attention_score(attention)
            self.count("attention_scores", 1)
        if values is not None:
            self.state.scores[block] = value_norm_score(values)
            self.count("value_scores", 1)
