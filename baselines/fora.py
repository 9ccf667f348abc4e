"""``fora``: FORA (Selvaraju et al., arXiv 2407.01425; prathebaselva/FORA @ acde628e).

A full step stores every block's attention and MLP outputs (before the adaLN gate); the steps
between reuse all of them, re-gated with their own step's gates.

Which steps are full follows the official code (``src/models.py`` lines 140–141, ``DiTBlock``
``boost_infer_static``): with i the respaced step index, counting *down* from T−1 (first,
noisiest step) to 0, a step is full iff ``i == T−1 or i % N == 0``. The phase is anchored at
the *last* step, which is therefore always full; where (T−1) mod N ≠ 0 the first cached run is
shorter than N−1 steps (DDPM-50 with N = 3: full at i = 49, 48, 45, …, 3, 0). At the official
example (DDPM-250, N = 3) this is the same as a full step every N steps from the first.

What is ours: the official DDIM loop passes no cache and cannot run FORA; on DDIM we apply the
same rule (ToCa's R = 0 mode anchors the same phase).
"""
from dataclasses import dataclass

from tokencache.cache import COMPUTE, REUSE, CacheMethod, param, register_method, sampling_steps


def fora_full_steps(num_steps: int, interval: int) -> list[bool]:
    """True where sampling step k (0 = first) is full: i = T−1−k, full iff i == T−1 or i % N == 0."""
    return [step.k == 0 or step.countdown % interval == 0 for step in sampling_steps(num_steps)]


@dataclass(frozen=True)
class FORAPlan:
    full: tuple  # full[k]: step k computes and stores every branch


@register_method
@dataclass
class FORA(CacheMethod):
    """FORA: full steps where the down-counting step index is divisible by N (and the first); all attention and MLP outputs reused between."""

    name = "fora"
    noop = {"interval": 1}
    search_space = {"interval": (2, 3, 4, 5, 6)}  # N; official 3
    interval: int = param(3, "N: full where the step index i (counting down) is divisible by N (official: 3)", min=1)

    def plan_for(self, info):
        return FORAPlan(tuple(fora_full_steps(info.num_steps, self.interval)))

    def branch_action(self, step, block, branch):
        return COMPUTE if self.plan.full[step] else REUSE
