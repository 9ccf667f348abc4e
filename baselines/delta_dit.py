"""``delta-dit``: Δ-DiT, stage-adaptive Δ-Cache (Chen et al., arXiv 2406.01125).

**No official code** has been published (the paper promises it). What the paper states (its
abstract and method summary): DiT's front blocks shape the outline of the image and its rear blocks
the details; Δ-DiT accelerates the *rear* blocks in the early sampling stage and the *front* blocks
in the later stage, switching at a boundary b, with an update interval N; its Δ-Cache stores the
deviation a cached span adds to its input, Δ = span output − span input at the last computed step,
and a cached step returns its *current* input + Δ (so the span still sees the previous image's
change, unlike a cache of the span's output). The paper reports 1.6× on 20-step PixArt-α/DiT-XL.

**Ours** (every choice below; the paper's exact values were not available to us):

* a full step every N steps from the first (k mod N = 0), every block computed; N = 2;
* the steps between reuse one span through its Δ (``Span(start, end, reuse=True)``): the last
  ``rear_blocks`` blocks while the stage is early, the first ``front_blocks`` once it is late;
* the stage of a cached step is that of the first step after its full step: early iff that step
  is < b·T (``boundary`` is b as a fraction of the steps, so one setting serves DDIM-50 and
  DDPM-250); a full step stores Δ of that stage's span only (two overlapping spans cannot both be
  stored in one pass). With N = 2 this is the stage of the cached step itself;
* span sizes: ``block_share`` (0.75) of the model's blocks, rounded (21 of DiT-XL/2's 28), unless
  ``front_blocks`` / ``rear_blocks`` give them; 0.75 with N = 2 gives 1/(1 − 0.75/2) = 1.6×, the
  paper's figure;
* on MDTv2 a span never cuts a long skip: the front span grows to the block that pops the last
  skip pushed inside it (its U's encoder), so on MDTv2 the late stage caches more than asked
  (``resolved()`` gives the spans used).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tokencache.cache import CacheMethod, Span, param, register_method


def delta_dit_spans(block_count: int, front_blocks: int, rear_blocks: int, skip_partners: dict) -> tuple:
    """((0, front end), (rear start, L−1)): the two cached spans, the front one grown so that it cuts no long skip."""
    for name, count in (("front_blocks", front_blocks), ("rear_blocks", rear_blocks)):
        if not 1 <= count <= block_count - 1:
            raise ValueError(f"delta-dit: {name} = {count}: a cached span needs 1…{block_count - 1} blocks of "
                             f"this model's {block_count}")
    end = front_blocks - 1
    while True:  # a skip pushed inside the span must be popped inside it
        grown = max([end] + [pop for push, pop in skip_partners.items() if push <= end < pop])
        if grown == end:
            break
        end = grown
    if end >= block_count - 1:
        raise ValueError(f"delta-dit: front_blocks = {front_blocks} cuts a long skip; the span that does not "
                         f"covers every block")
    # the rear span holds the pop of every skip pushed inside it (pops come after pushes); skips
    # pushed before it and popped inside are read from the stack as First-Block Cache's span does
    return (0, end), (block_count - rear_blocks, block_count - 1)


def delta_dit_schedule(num_steps: int, interval: int, boundary: float) -> tuple:
    """Per step k: None (full) or "rear" / "front" — the stage of the first step after its full step."""
    boundary_step = int(boundary * num_steps + 0.5)
    plan, stage = [], None
    for k in range(num_steps):
        if k % interval == 0:
            plan.append(None)
            stage = "rear" if k + 1 < boundary_step else "front"
        else:
            plan.append(stage)
    return tuple(plan)


@dataclass(frozen=True)
class DeltaPlan:
    stages: tuple  # per step: None (full), "rear" or "front"
    spans: dict  # stage → (start, end)


@register_method
@dataclass
class DeltaDiT(CacheMethod):
    """Δ-Cache: reuse the rear blocks' deviation early and the front blocks' late, a full step every N."""

    name = "delta-dit"
    noop = {"interval": 1}
    search_space = {"interval": (2, 3, 4), "block_share": (0.5, 0.75)}  # N × span share; ours 2 × 0.75
    interval: int = param(2, "N (ours: 2): a full step every N steps from the first", min=1)
    boundary: float = param(0.5, "b as a fraction of the steps (ours: 0.5): before it the rear blocks are cached, "
                                 "after it the front blocks", min=0.0, max=1.0)
    block_share: float = param(0.75, "share of the blocks in each cached span (ours: 0.75, 21 of DiT-XL/2's 28)",
                          min=0.0, max=1.0)
    front_blocks: Optional[int] = param(None, "blocks of the front span (None: from `block_share`)", min=1)
    rear_blocks: Optional[int] = param(None, "blocks of the rear span (None: from `block_share`)", min=1)

    def plan_for(self, info):
        share = max(1, round(self.block_share * info.block_count))
        front, rear = delta_dit_spans(info.block_count, self.front_blocks or share, self.rear_blocks or share,
                                      info.skip_partners)
        return DeltaPlan(delta_dit_schedule(info.num_steps, self.interval, self.boundary),
                         {"front": front, "rear": rear})

    def resolved(self):
        if self.plan is None:
            return self.params()
        return {**self.params(), "front_span": list(self.plan.spans["front"]),
                "rear_span": list(self.plan.spans["rear"]),
                "boundary_step": int(self.boundary * self.info.num_steps + 0.5)}

    def block_action(self, step, block, inputs):
        stage = self.plan.stages[step]
        if stage is None:  # full: store the Δ of the span the next steps reuse
            stage = self.plan.stages[step + 1] if step + 1 < len(self.plan.stages) else None
            start, end = self.plan.spans.get(stage, (None, None))
            return Span(start, end, reuse=False) if block == start else None
        start, end = self.plan.spans[stage]
        return Span(start, end, reuse=True) if block == start else None
