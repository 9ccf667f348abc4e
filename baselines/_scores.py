"""Scoring pieces several methods share, written once (a helper module, not a method: no registration).

* **Attention score** s1 (ToCa, DuCa, TokenCache's ``token_choice=attention``): the
  head-averaged attention map's column sums, L2-normalised over the tokens — ToCa @ e84096ff
  ``DiT-ToCa/cache_functions/scores.py`` 12 and DuCa @ 0a7151b7 ``DuCa-DiT/cache_functions/scores.py``
  11, the same expression. Price: :func:`attention_score_macs`.
* **Staleness + spatial bonus token choice** (ToCa, DuCa: the same official ``cache_cutfresh``):
  score = s1 + λ·(steps since the token was last recomputed)/N (``score_evaluate.py`` 64–70),
  the best token of each 2×2 cell of the token grid boosted by s4 × its score
  (``cache_cutfresh.py`` 21, 52–82), the top k by a descending sort recomputed and their
  counters reset, every other counter + 1 (``cache_cutfresh.py`` 23–33). Ours: ties go to the
  lower token index (a stable sort; the official sort is not stable, and ties of float scores
  do not occur in practice). Price: :data:`TOKEN_SCORE_MACS` per token scored.
* **Relative L1 change** (First-Block Cache, TeaCache): mean|a − b| / mean|b| per sample, in the
  tensors' dtype (float32 as the official ``.item()`` reads it) — diffusers @ 58eb52c0
  ``src/diffusers/hooks/first_block_cache.py`` 138–142, TeaCache @ 7c10efc4
  ``eval/teacache/experiments/latte.py`` 180–182. Price: :data:`RELATIVE_L1_MACS` per value.

Prices are MAC-equivalents per unit of the overhead counter (see
:meth:`tokencache.cache.CacheMethod.overhead_macs`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tokencache.cache import REUSE, Subset

#: side of the grid cells of the spatial bonus (official ``grid_size`` 2)
CELL = 2
#: one token scored for a subset choice: the s3 multiply-add and the 2×2 bonus (the sort's
#: comparisons are not MACs)
TOKEN_SCORE_MACS = 2
#: one value compared by a relative L1 change: the difference and two absolute sums
RELATIVE_L1_MACS = 3


def attention_score(attention: torch.Tensor) -> torch.Tensor:
    """s1 (B, N): the head-averaged attention each token receives, L2-normalised over the tokens.

    ``attention`` (B, H, N, N) are the softmax probabilities of one block's attention.
    """
    return F.normalize(attention.mean(dim=1).sum(dim=1), dim=1, p=2)


def attention_score_macs(shape) -> int:
    """One map reduced to s1: the head mean H·N², the column sum N², the L2 norm N."""
    n = shape.tokens
    return shape.heads * n * n + n * n + n


def top_tokens(score: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest-scoring tokens of each row (B, k), descending; ties to the lower index (stable)."""
    return torch.argsort(score, dim=1, descending=True, stable=True)[:, :k]


def spatial_bonus(score: torch.Tensor, bonus: float, grid: int) -> torch.Tensor:
    """Add ``bonus`` × its score to the best token of every 2×2 cell of the token grid (s4)."""
    b, n = score.shape
    g = grid // CELL
    cells = score.view(b, g, CELL, g, CELL).permute(0, 1, 3, 2, 4).reshape(b, g * g, CELL * CELL)
    best, where = cells.max(dim=-1, keepdim=True)
    cells = cells.scatter_add(-1, where, best * bonus)
    return cells.view(b, g, g, CELL, CELL).permute(0, 1, 3, 2, 4).reshape(b, n)


def check_bonus_grid(method: str, bonus: float, grid: int) -> None:
    """The 2×2 spatial bonus needs an even token grid: a one-line ValueError otherwise."""
    if bonus > 0 and grid % CELL:
        raise ValueError(f"{method}: the 2×2 spatial bonus needs an even token grid, got {grid}×{grid} "
                         "(set spatial_bonus=0)")


def choose_fresh_tokens(stale_map: dict, key, scores: torch.Tensor, k: int, interval: int, stale_weight: float,
                        bonus: float, grid: int):
    """The k tokens a ToCa-style step recomputes (``cache_cutfresh``), or REUSE when k is 0.

    Score = the attention score s1 (``scores``, (B, N)) + λ·(steps since the token was last
    fresh) / N (λ = ``stale_weight``, N = ``interval``), the best token of each 2×2 cell of the
    ``grid`` × ``grid`` token grid boosted by s4 = ``bonus``; the top k recomputed (descending,
    stable); their counters in ``stale_map[key]`` reset to 0, the others + 1. The caller
    counts ``N`` scored tokens when the answer is a :class:`~tokencache.cache.Subset`.
    """
    stale = stale_map.get(key)
    if stale is None:
        stale = torch.zeros_like(scores, dtype=torch.int32)
    if k == 0:
        stale_map[key] = stale + 1
        return REUSE
    score = scores + stale_weight * (stale.float() / interval)
    if bonus > 0:
        score = spatial_bonus(score, bonus, grid)
    tokens = top_tokens(score, k)
    stale_map[key] = (stale + 1).scatter_(1, tokens, 0)
    return Subset(tokens)


def relative_l1(current: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """mean|current − reference| / mean|reference| per row of (S, K) tensors, in their dtype (float32)."""
    return (current - reference).abs().mean(dim=1) / reference.abs().mean(dim=1)
