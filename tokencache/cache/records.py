"""What a generation really computed: tokens per step, block and branch, summed over batch rows.

Counts are kept as sums over the batch rows (with CFG the model sees two rows per image), so
that per-row decisions (a span skipped for some samples only) are counted exactly; the per-row
mean ``counts`` is what MACs are priced from. MACs per row follow from a per-row count c (D
hidden size, N tokens, hidden MLP 4D):

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
    """Token sums ``token_sums[step, block, branch]`` (branch 0 = attn, 1 = mlp), blocks run, overheads.

    ``rows`` is the batch size the model saw; :attr:`counts` = sums ÷ rows (N for a branch every
    row computed fully, 0 where every row reused). ``overhead[name][step]`` counts a method's
    extra decision work per batch row.
    """

    def __init__(self, num_steps: int, block_count: int, num_tokens: int):
        self.num_steps = num_steps
        self.block_count = block_count
        self.num_tokens = num_tokens
        self.token_sums = np.zeros((num_steps, block_count, 2), dtype=np.int64)
        self.block_sums = np.zeros((num_steps, block_count), dtype=np.int64)
        self.branch_row_sums = np.zeros((num_steps, block_count, 2), dtype=np.int64)
        self.overhead: dict[str, np.ndarray] = {}
        #: tokens and block runs of shadow computations (a block run for the method's eyes only,
        #: ``BlockInput.shadow``): real work, kept apart from the counts the model's output needed
        #: and priced by the method as overhead
        self.shadow_token_sums = np.zeros((num_steps, block_count, 2), dtype=np.int64)
        self.shadow_block_sums = np.zeros((num_steps, block_count), dtype=np.int64)
        self.rows = 0
        self.steps_run = 0
        self.host_syncs = 0

    def add_tokens(self, step: int, block: int, branch: int, tokens: int, rows: int) -> None:
        self.token_sums[step, block, branch] += int(tokens) * int(rows)
        if tokens > 0:
            self.branch_row_sums[step, block, branch] += int(rows)

    def add_block(self, step: int, block: int, rows: int) -> None:
        self.block_sums[step, block] += int(rows)

    def add_overhead(self, step: int, name: str, amount: int) -> None:
        if name not in self.overhead:
            self.overhead[name] = np.zeros(self.num_steps, dtype=np.int64)
        self.overhead[name][step] += int(amount)

    @property
    def counts(self) -> np.ndarray:
        """Tokens computed per batch row (float64, the mean over rows): (steps, blocks, 2)."""
        return self.token_sums / max(self.rows, 1)

    @property
    def blocks_run(self) -> np.ndarray:
        """Fraction of batch rows that ran each block at each step: (steps, blocks)."""
        return self.block_sums / max(self.rows, 1)

    @property
    def branch_rows(self) -> np.ndarray:
        """Fraction of batch rows that computed each branch on at least one token: (steps, blocks, 2).

        With per-row decisions the mean count alone cannot tell "every row computed k tokens"
        from "k/N of the rows computed all N": attention pays its LayerNorm and keys and values
        of all N tokens in every row that computes any token, so MACs need this fraction too.
        """
        return self.branch_row_sums / max(self.rows, 1)

    def per_step(self) -> dict:
        """Per step: fractions of block-branches computed on every token / reused / partly, and of tokens."""
        n, c = self.num_tokens, self.counts
        return {
            "computed": (c == n).mean(axis=(1, 2)).round(6).tolist(),
            "cached": (c == 0).mean(axis=(1, 2)).round(6).tolist(),
            "partial": ((c > 0) & (c < n)).mean(axis=(1, 2)).round(6).tolist(),
            "token_fraction": (c.sum(axis=(1, 2)) / (c.shape[1] * 2 * n)).round(6).tolist(),
        }

    def summary(self, counts: bool = True) -> dict:
        """JSON-serialisable summary: skipped and computed fractions, per-step decisions, and
        (``counts=True``) the per-row ``counts`` and ``blocks_run`` arrays as nested lists."""
        n, c = self.num_tokens, self.counts
        total = c.size * n
        out = {
            "num_steps": self.num_steps,
            "steps_run": self.steps_run,
            "block_count": self.block_count,
            "num_tokens": self.num_tokens,
            "rows": self.rows,
            "host_syncs": self.host_syncs,
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
            out["counts"] = _plain(c)
            out["blocks_run"] = _plain(self.blocks_run)
            out["branch_rows"] = _plain(self.branch_rows)
        return out


def _plain(values: np.ndarray) -> list:
    """Nested lists with integers where a value is whole (the common case: every row alike)."""
    if np.all(values == np.round(values)):
        return values.astype(np.int64).tolist()
    return values.tolist()
