"""``fora``: FORA (Selvaraju et al., arXiv 2407.01425, prathebaselva/FORA).

A full step every N steps stores every block's attention and MLP outputs (before the adaLN
gate); the N−1 steps between reuse all of them, re-gated with their own step's gates.
"""
from dataclasses import dataclass

from tokencache.cache import COMPUTE, REUSE, CacheMethod, param, register_method


@register_method
@dataclass
class FORA(CacheMethod):
    """FORA: full step every N steps; all attention and MLP outputs reused on the N−1 steps between."""

    name = "fora"
    interval: int = param(3, "N: a full step every N steps (official: 3)", min=1)

    def branch_action(self, step, block, branch):
        return COMPUTE if step % self.interval == 0 else REUSE
