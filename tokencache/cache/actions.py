"""What a method may tell the engine to do, for one branch or for a span of blocks.

Branch actions (the answer to ``branch_action(step, block, branch)``):

* :data:`COMPUTE` / :class:`Compute` — run the branch on all tokens and store its pre-gate output;
* :data:`REUSE` / :class:`Reuse` — return the stored pre-gate output (re-gated by the block with
  this step's gate); ``Reuse(rows=mask)`` reuses only in the batch rows where ``mask`` is True
  and computes the others;
* :class:`Subset` — recompute the tokens ``tokens`` (B, k) of each row and scatter them into the
  stored output, or (``finish``) hand the recomputed tokens to the method, which returns the
  whole output;
* :class:`Blend` — ``stored·(1 − w) + fresh·w`` with a differentiable ``w`` (the relaxations
  that train Learning-to-Cache's router and TokenCache's predictor);
* :class:`Forecast` — use an output the method computed itself (TaylorSeer's Taylor series); the
  engine stores it like a computed output and counts no token; ``Forecast(output, rows=mask)``
  uses it only in the rows where ``mask`` is True and computes the others.

Span action (the answer to ``block_action(step, block, inputs)``; ``None`` runs the block):

* :class:`Span` — blocks ``start…end`` as one unit cached through its residual
  x_out(end) − x_in(start). ``reuse=False``: every row runs the blocks and stores the residual;
  ``reuse=True``: every row returns x_in + the stored residual and no block of the span runs;
  ``reuse=mask`` (bool (B,) on the model's device): per row. :func:`ComputeSpan` and
  :func:`ReuseSpan` are the two batch-wide forms.

Per-row masks keep a sample's result independent of its batch neighbours. Without host
synchronisation the engine cannot know which rows to skip, so it computes every row and selects
per row (exact, no saving); a method that declares ``host_sync = True`` lets the engine read the
mask and compute only the rows that need it (one synchronisation per decision).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch


@dataclass(frozen=True)
class Compute:
    """Run the branch on all tokens.

    ``store=False`` skips keeping the output (methods that never reuse it save memory);
    ``attention=True`` runs the attention branch with explicit softmax and hands the
    probabilities (B, heads, N, N) to the method's ``observe`` (ToCa's token scores);
    ``values=True`` hands it the value heads (B, heads, N, head_dim) as ``observe(…, values=)``
    (for scores from the values; the attention stays fused unless ``attention`` is asked for too).
    """

    store: bool = True
    attention: bool = False
    values: bool = False


@dataclass(frozen=True)
class Reuse:
    """Return the stored pre-gate output; with ``rows`` (bool (B,)), only where ``rows`` is True."""

    rows: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class Subset:
    """Recompute the tokens ``tokens`` (B, k) int64 of each batch row; reuse the others.

    ``tokens`` of shape (1, k) applies the same tokens to every row (methods whose choice
    depends only on the step and block, such as TokenCache v1's predictor).

    Every row recomputes the same number k of tokens (a batched computation costs k per row
    whatever a row would have needed), so the engine counts k per row.

    ``finish``: a callable ``finish(fresh) → output``. The engine computes the branch for the
    tokens only, ``fresh`` (B, k, D), and the method turns it into the whole output (B, N, D)
    (e.g. a forecast refreshed at those tokens and spread to others); the engine stores and
    returns that output, needs nothing stored before, and counts k tokens per row.
    """

    tokens: torch.Tensor
    finish: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


@dataclass(frozen=True)
class Blend:
    """Return ``stored·(1 − weight) + fresh·weight`` (fresh = the branch on all tokens).

    ``weight`` carries gradient and broadcasts against the branch output (B, N, D): a 0-d
    tensor (L2C's σ(router logit), one per branch) or an (N, 1) column (TokenCache's per-token
    importance w). The result is not stored, so the cache keeps the last full computation.
    """

    weight: torch.Tensor


@dataclass(frozen=True)
class Forecast:
    """Use ``output`` (B, N, D), computed by the method from its own state, as the branch output.

    The engine stores it (a copy under CUDA graphs, like any stored output), counts no token
    for the branch (the model computed nothing) and returns it to the block, which gates it
    with this step's gate. The method counts the arithmetic of its forecast as overhead.

    ``rows`` (bool (B,)): use the forecast only in the rows where it is True; the other rows
    compute the branch (only those rows when the method declares ``host_sync``, else every row,
    the forecast selected per row), and ``observe`` is told about the computed rows (``rows``
    their indices, or None when every row was computed).
    """

    output: torch.Tensor
    rows: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class Span:
    """Blocks ``start…end`` (inclusive) cached through their residual x_out(end) − x_in(start).

    ``reuse``: False — run the blocks, store the residual; True — skip them, return x_in + the
    stored residual; a bool tensor (B,) — per batch row. Returned at block ``start``; the engine
    applies it to the blocks up to ``end`` without asking again. ``keep="output"`` stores block
    ``end``'s output itself instead, and a reuse returns it whatever the span's input (DuCa's
    aggressive step replaces the residual stream with the last block's previous output); that
    output belongs to block ``end``, so spans of any start ending there share it.
    """

    start: int
    end: int
    reuse: Union[bool, torch.Tensor] = False
    keep: str = "residual"


def ComputeSpan(start: int, end: int) -> Span:  # noqa: N802 (reads like the action it builds)
    """Run blocks ``start…end`` and store their residual."""
    return Span(start, end, False)


def ReuseSpan(start: int, end: int) -> Span:  # noqa: N802
    """Skip blocks ``start…end``: the first returns x_in + the stored residual, the rest x_in."""
    return Span(start, end, True)


COMPUTE = Compute()
COMPUTE_NO_STORE = Compute(store=False)
REUSE = Reuse()
