"""``deepcache``: DeepCache (Ma et al., CVPR 2024) adapted to diffusion transformers.

DeepCache caches a U-Net's deep features and recomputes only the shallow path (the outermost
down block, its skip, the outermost up block) at every step, refreshing everything every N
steps. A transformer has no U unless its long skips make one, so we choose (there is no
canonical DiT adaptation):

* no long skips (DiT, MDT v1): recompute the first k and the last k blocks every step; the
  middle span [k, L−k−1] is reused through its residual x_out(L−k−1) − x_in(k), stored on full
  steps;
* long skips (MDTv2: encoder block j pushes, block 2h−1−j pops): the U is explicit; recompute
  the first k pushing blocks, their skip partners and everything after the U (the decoder);
  reuse the span [k, partner(k)] between them. The skips pushed inside the span are consumed
  only inside it, so skipping it is consistent.

With k = 1 and N = 3 this is DeepCache's default (cache_branch_id 0, cache_interval 3).

What is ours (DeepCache has official code for U-Nets only, horseee/DeepCache): both spans are
our adaptation; full steps are every N steps from the first (DeepCache's own schedule).
"""
from dataclasses import dataclass

from tokencache.cache import COMPUTE_NO_STORE, CacheMethod, ComputeSpan, ReuseSpan, Span, param, register_method


@dataclass(frozen=True)
class DeepCachePlan:
    span: tuple  # (first, last) block of the reused deep span
    compute_span: Span  # the action of a full step at the span's first block
    reuse_span: Span  # the action of the steps between


@register_method
@dataclass
class DeepCache(CacheMethod):
    """DeepCache for transformers: shallow blocks every step, the deep span's residual reused between full steps."""

    name = "deepcache"
    noop = {"interval": 1}
    search_space = {"interval": (2, 3, 4, 5), "shallow_blocks": (1, 2)}  # N × k; ours 3 × 1
    interval: int = param(3, "N: full refresh every N steps (DeepCache's cache_interval)", min=1)
    shallow_blocks: int = param(1, "k: blocks recomputed every step at each end (DeepCache branch 0 → 1)", min=0)

    def plan_for(self, info):
        k, partners = self.shallow_blocks, info.skip_partners
        if partners:
            end = partners.get(k, k - 1)  # past the U's bottom: nothing left between the ends
        else:
            end = info.block_count - k - 1
        if end < k:
            kind = f"U of {len(partners)} long skips" if partners else f"{info.block_count} blocks"
            raise ValueError(f"deepcache: shallow_blocks={k} leaves no block to cache in this {info.family} "
                             f"({kind}); use a smaller shallow_blocks")
        return DeepCachePlan((k, end), ComputeSpan(k, end), ReuseSpan(k, end))

    def block_action(self, step, block, inputs):
        plan = self.plan
        if block != plan.span[0]:
            return None
        return plan.compute_span if step % self.interval == 0 else plan.reuse_span

    def branch_action(self, step, block, branch):
        return COMPUTE_NO_STORE
