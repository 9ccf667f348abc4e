"""What a generation really computed: token counts per step, block and branch, plus overheads.

Counts are per batch row (with CFG the model sees two rows per image: conditional and null
label). MACs per row follow from them (D hidden size, N tokens, c a count, hidden MLP 4D):

* attention with c tokens (0 < c ≤ N): queries c·D², keys and values 2·N·D² (always all N
  tokens, so the chosen tokens get exact values), logits and weighted sum 2·c·N·D, output
  projection c·D² — at c = N the full 4·N·D² + 2·N²·D;
* MLP with c tokens: 8·c·D²;
* a block that ran (``blocks_run``; 0 only inside a span reused through its residual) also
  computes its adaLN modulation (6·D² per row) and, in MDTv2's skip blocks, ``skip_linear``
  on all N tokens (2·N·D²).
"""
from __future__ import annotations

import numpy as np

BRANCHES = ("attn", "mlp")


class Record:
    """Token counts ``counts[step, block, branch]`` (branch 0 = attn, 1 = mlp) and overheads.

    A full branch counts N, a reuse 0, a subset k. ``overhead[name][step]`` counts a method's
    extra decision work per batch row (see :class:`tokencache.cache.engine.CacheEngine`).
    """

    def __init__(self, num_steps: int, block_count: int, num_tokens: int):
        self.num_steps = num_steps
        self.block_count = block_count
        self.num_tokens = num_tokens
        self.counts = np.zeros((num_steps, block_count, 2), dtype=np.int64)
        self.blocks_run = np.zeros((num_steps, block_count), dtype=np.int64)
        self.overhead: dict[str, np.ndarray] = {}
        self.rows = 0
        self.steps_run = 0

    def add_overhead(self, step: int, name: str, amount: int) -> None:
        if name not in self.overhead:
            self.overhead[name] = np.zeros(self.num_steps, dtype=np.int64)
        self.overhead[name][step] += int(amount)

    def per_step(self) -> dict:
        """Per step: fractions of block-branches computed fully / reused / partly, and of tokens."""
        n, c = self.num_tokens, self.counts
        return {
            "full": (c == n).mean(axis=(1, 2)).round(6).tolist(),
            "cached": (c == 0).mean(axis=(1, 2)).round(6).tolist(),
            "partial": ((c > 0) & (c < n)).mean(axis=(1, 2)).round(6).tolist(),
            "token_fraction": (c.sum(axis=(1, 2)) / (c.shape[1] * 2 * n)).round(6).tolist(),
        }

    def summary(self, counts: bool = True) -> dict:
        """JSON-serialisable summary: skipped and computed fractions, per-step decisions, and
        (``counts=True``) the full ``counts`` and ``blocks_run`` arrays as nested lists."""
        n, c = self.num_tokens, self.counts
        total = c.size * n
        out = {
            "num_steps": self.num_steps,
            "steps_run": self.steps_run,
            "block_count": self.block_count,
            "num_tokens": self.num_tokens,
            "rows": self.rows,
            "skipped_fraction": round(float((c == 0).mean()), 6),
            "partial_fraction": round(float(((c > 0) & (c < n)).mean()), 6),
            "token_fraction": round(float(c.sum() / total), 6),
            "attn_token_fraction": round(float(c[..., 0].sum() / (total / 2)), 6),
            "mlp_token_fraction": round(float(c[..., 1].sum() / (total / 2)), 6),
            "full_steps": int((c == n).all(axis=(1, 2)).sum()),
            "blocks_run_fraction": round(float(self.blocks_run.mean()), 6),
            "per_step": self.per_step(),
            "overhead": {k: {"total": int(v.sum()), "per_step": v.tolist()} for k, v in sorted(self.overhead.items())},
        }
        if counts:
            out["counts"] = c.tolist()
            out["blocks_run"] = self.blocks_run.tolist()
        return out
