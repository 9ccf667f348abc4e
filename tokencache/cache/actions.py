"""What a method may tell the engine to do, for one branch or one block.

Branch actions (answer to ``branch_action(step, block, branch)``):

* :data:`COMPUTE` / :class:`Compute` — run the branch on all tokens and store its pre-gate output;
* :data:`REUSE` — return the stored pre-gate output (re-gated by the block with this step's gate);
* :class:`Subset` — recompute the tokens ``tokens`` (B, k) of each sample and scatter them into
  the stored output;
* :class:`Blend` — ``stored·(1 − w) + fresh·w`` with a differentiable ``w`` (Learning-to-Cache's
  relaxation while its router is trained).

Block actions (answer to ``block_action(step, block)``; ``None`` runs the block as usual):

* :class:`ComputeSpan` — blocks ``start…end`` run; the span's residual x_out(end) − x_in(start)
  is stored;
* :class:`ReuseSpan` — block ``start`` returns x_in + stored residual, the other blocks of the
  span return their input unchanged, and no branch of the span runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Compute:
    """Run the branch on all tokens.

    ``store=False`` skips keeping the output (methods that never reuse it save memory);
    ``attention=True`` runs the attention branch with explicit softmax and hands the
    probabilities (B, heads, N, N) to the method's ``observe`` (ToCa's token scores).
    """

    store: bool = True
    attention: bool = False


@dataclass(frozen=True)
class Reuse:
    """Return the stored pre-gate output unchanged."""


@dataclass(frozen=True)
class Subset:
    """Recompute the tokens ``tokens`` (B, k) int64 of each batch row; reuse the others.

    ``tokens`` of shape (1, k) applies the same tokens to every row (methods whose choice
    depends only on the step and block, such as TokenCache's predictor).

    Every row recomputes the same number k of tokens (a batched computation costs k per row
    whatever a row would have needed), so the engine counts k per row.
    """

    tokens: torch.Tensor


@dataclass(frozen=True)
class Blend:
    """Return ``stored·(1 − weight) + fresh·weight`` (fresh = the branch on all tokens).

    ``weight`` carries gradient and broadcasts against the branch output (B, N, D): a 0-d
    tensor (L2C's σ(router logit), one per branch) or an (N, 1) column (TokenCache's per-token
    importance w). The result is not stored, so the cache keeps the last full computation.
    """

    weight: torch.Tensor


@dataclass(frozen=True)
class ComputeSpan:
    """Run blocks ``start…end`` (inclusive) and store their residual x_out(end) − x_in(start)."""

    start: int
    end: int


@dataclass(frozen=True)
class ReuseSpan:
    """Skip blocks ``start…end``: the first returns x_in + the stored residual, the rest x_in."""

    start: int
    end: int


COMPUTE = Compute()
COMPUTE_NO_STORE = Compute(store=False)
REUSE = Reuse()
