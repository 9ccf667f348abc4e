"""``toca``: ToCa, token-wise feature caching (Zou et al., ICLR 2025; Shenyi-Z/ToCa ``DiT-ToCa/``).

Rules, as in the official DiT code (``cal_type``, ``force_scheduler``, ``fresh_ratio_scheduler``,
``score_evaluate``, ``cache_cutfresh``); s counts down from T−1 (first step) to 0 as there:

* Full steps: the first step, then every step with s % I == 0, where I is set at each full step
  to round(N / (1 + w − 2w·s/T)) (w = 0.4; float32 round-half-even), forced to 2 for s in
  [⌊0.2T⌋, ⌊0.4T⌋) — and w = 0 with no forcing when R = 0 (the official FORA mode). A full step
  runs attention with explicit softmax to score tokens.
* ToCa steps, per block l and module: ratio = clamp(R · layer · step · module, 0, 1) and
  k = ⌊ratio·N⌋ tokens recomputed, the others reused. ``ToCa-ddpm250``: step 1.4 − 0.8·s/T,
  layer 1.8 − 1.6·l/(L−1); ``ToCa-ddim50``: step 3 − 4·s/T, layer 0.8 + 0.4·l/(L−1); module
  factor attn 1 − 0.4·m, mlp 1 + 0.6·m (m = 2.5: attention fully reused, MLP ×2.5); ``constant``:
  R for both modules. (The official code divides by 27 for DiT-XL's 28 blocks: L−1 here.)
* Token score: s1 = L2-normalised column sum of the head-averaged attention map of the block's
  last full step (attention a token receives) + 0.25 · (steps since the token was last
  recomputed in this module) / N; then the best token of each 2×2 grid cell gets +0.6 × its
  score; the top k are recomputed and their counters reset.

Overhead counters (per batch row): ``attention_scores`` — attention maps reduced to s1 on full
steps (head mean H·N², column sum N², L2 norm N); ``token_scores`` — tokens scored for a subset
choice (s3 and s4 terms, a sort of N scores). The explicit-softmax attention itself is the
engine's ``explicit_attention``.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from tokencache.cache import COMPUTE, REUSE, CacheMethod, Compute, Subset, param, register_method

SCHEDULES = ("auto", "ToCa-ddpm250", "ToCa-ddim50", "constant")
#: (step weight, layer weight) of the official fresh-ratio schedulers.
SCHEDULE_WEIGHTS = {"ToCa-ddpm250": (0.4, 0.8), "ToCa-ddim50": (2.0, -0.2)}
MODULE_TIME_WEIGHT = 0.6  # official: share of a block's time spent in the MLP
CELL = 2  # side of the grid cells of the spatial bonus (official grid_size 2)


def spatial_bonus(score: torch.Tensor, bonus: float, grid: int) -> torch.Tensor:
    """Add ``bonus`` × its score to the best token of every 2×2 cell of the token grid (s4)."""
    b, n = score.shape
    g = grid // CELL
    cells = score.view(b, g, CELL, g, CELL).permute(0, 1, 3, 2, 4).reshape(b, g * g, CELL * CELL)
    best, where = cells.max(dim=-1, keepdim=True)
    cells = cells.scatter_add(-1, where, best * bonus)
    return cells.view(b, g, g, CELL, CELL).permute(0, 1, 3, 2, 4).reshape(b, n)


def full_step_schedule(num_steps: int, interval: int, ratio: float, weight: float, sensitive: int) -> list[bool]:
    """Which sampling steps (0 = first) are full, by the official force-fresh rules."""
    weight = 0.0 if ratio == 0 else weight
    full, threshold = [], interval
    for step in range(num_steps):
        s = num_steps - 1 - step
        is_full = step == 0 or s % threshold == 0
        if is_full:
            factor = torch.tensor(1 + weight - 2 * weight * s / num_steps)
            threshold = int(torch.round(interval / factor))
            if ratio != 0 and int(num_steps * 0.2) <= s < int(num_steps * 0.4):
                threshold = sensitive
            threshold = max(threshold, 1)
        full.append(is_full)
    return full


def fresh_tokens(schedule: str, ratio: float, s: int, num_steps: int, layer: int, layers: int, module: str,
                 module_weight: float, num_tokens: int) -> int:
    """k = ⌊clamp(R·layer·step·module, 0, 1)·N⌋, in the official float32 arithmetic."""
    if schedule == "constant":
        value = ratio
    else:
        step_w, layer_w = SCHEDULE_WEIGHTS[schedule]
        depth = layer / (layers - 1) if layers > 1 else 0.0
        step_factor = 1 + step_w - 2 * step_w * s / num_steps
        layer_factor = 1 + layer_w - 2 * layer_w * depth
        if module == "attn":
            module_factor = 1 - (1 - MODULE_TIME_WEIGHT) * module_weight
        else:
            module_factor = 1 + MODULE_TIME_WEIGHT * module_weight
        value = ratio * layer_factor * step_factor * module_factor
    return int(torch.clamp(torch.tensor(value), 0.0, 1.0) * num_tokens)


@register_method
@dataclass
class ToCa(CacheMethod):
    """ToCa: full steps on the force-fresh schedule; in between, recompute the top-scored R·factor tokens per block."""

    name = "toca"
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
    module_weight: float = param(2.5, "m: module factors attn 1 − 0.4m (0 at 2.5), mlp 1 + 0.6m", min=0.0, max=2.5)

    def setup(self, info):
        super().setup(info)
        ddpm = info.sampler_loop == "ddpm"
        self.base_interval = self.interval or (4 if ddpm else 3)
        self.ratio_schedule = self.schedule if self.schedule != "auto" else ("ToCa-ddpm250" if ddpm else "ToCa-ddim50")
        T, L, N = info.num_steps, info.block_count, info.num_tokens
        self.full = full_step_schedule(T, self.base_interval, self.fresh_ratio, self.interval_weight,
                                       self.sensitive_interval)
        self.tokens = [None if self.full[k] else
                       [{m: fresh_tokens(self.ratio_schedule, self.fresh_ratio, T - 1 - k, T, layer, L, m,
                                         self.module_weight, N) for m in ("attn", "mlp")} for layer in range(L)]
                       for k in range(T)]
        self.needs_scores = any(0 < row[m] < N for plan in self.tokens if plan for row in plan for m in row)
        if self.needs_scores and self.spatial_bonus > 0 and info.grid_size % CELL:
            raise ValueError(f"toca: the 2×2 spatial bonus needs an even token grid, got {info.grid_size}×"
                             f"{info.grid_size} (set spatial_bonus=0)")
        self.full_attention = Compute(attention=True) if self.needs_scores else COMPUTE

    def reset(self):
        self.scores = {}  # block → s1 (B, N) from its last full step
        self.stale = {}  # (block, module) → steps since each token's last recompute (B, N)

    def branch_action(self, step, block, branch):
        key = (block, branch)
        if self.full[step]:
            self.stale.pop(key, None)  # every token fresh: counters at 0
            return self.full_attention if branch == "attn" else COMPUTE
        k = self.tokens[step][block][branch]
        if k >= self.info.num_tokens:
            self.stale.pop(key, None)
            return COMPUTE
        if not self.needs_scores:  # no step of this schedule recomputes a proper subset
            return REUSE
        stale = self.stale.get(key)
        if stale is None:
            stale = torch.zeros_like(self.scores[block], dtype=torch.int32)
        if k == 0:
            self.stale[key] = stale + 1
            return REUSE
        score = self.scores[block] + self.soft_fresh_weight * stale / self.base_interval
        if self.spatial_bonus > 0:
            score = spatial_bonus(score, self.spatial_bonus, self.info.grid_size)
        tokens = torch.argsort(score, dim=1, descending=True, stable=True)[:, :k]
        self.stale[key] = (stale + 1).scatter_(1, tokens, 0)
        self.count("token_scores", self.info.num_tokens)
        return Subset(tokens)

    def observe(self, step, block, branch, *, x, output, attention):
        if attention is not None:
            self.scores[block] = F.normalize(attention.mean(dim=1).sum(dim=1), dim=1, p=2)
            self.count("attention_scores", 1)
