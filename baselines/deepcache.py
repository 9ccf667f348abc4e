"""``deepcache``: DeepCache (Ma et al., CVPR 2024) adapted to diffusion transformers.

DeepCache caches a U-Net's deep features and recomputes only the shallow path (the outermost
down block, its skip, the outermost up block) at every step, refreshing everything every N
steps. A transformer has no U, so we choose one (there is no canonical DiT adaptation):

* DiT and MDT v1: recompute the first k and the last k blocks every step; the middle span
  [k, L−k−1] is reused through its residual x_out(L−k−1) − x_in(k), stored on full steps.
* MDTv2: its long skips pair encoder block j with block 2h−1−j (h = half_depth), so the U is
  explicit: recompute the first k encoder blocks, their skip partners and the decoder blocks;
  reuse the span [k, 2h−k−1] between them. The skips pushed inside the span are consumed only
  inside it, so skipping it is consistent.

With k = 1 and N = 3 this is DeepCache's default (cache_branch_id 0, cache_interval 3).

What is ours (DeepCache has official code for U-Nets only, horseee/DeepCache): both the DiT/MDT
v1 span (first and last k blocks recomputed) and the MDTv2 span along its long skips are our
adaptation; full steps are every N steps from the first (DeepCache's own schedule).
"""
from dataclasses import dataclass

from tokencache.cache import COMPUTE_NO_STORE, CacheMethod, ComputeSpan, ReuseSpan, param, register_method


@register_method
@dataclass
class DeepCache(CacheMethod):
    """DeepCache for transformers: shallow blocks every step, the deep span's residual reused between full steps."""

    name = "deepcache"
    interval: int = param(3, "N: full refresh every N steps (DeepCache's cache_interval)", min=1)
    shallow_blocks: int = param(1, "k: blocks recomputed every step at each end (DeepCache branch 0 → 1)", min=0)

    def setup(self, info):
        super().setup(info)
        k = self.shallow_blocks
        if info.family == "MDTv2":
            self.span = (k, 2 * info.half_depth - k - 1)
        else:
            self.span = (k, info.block_count - k - 1)
        if self.span[1] < self.span[0]:
            half = f", encoder half {info.half_depth}" if info.family == "MDTv2" else ""
            raise ValueError(f"deepcache: shallow_blocks={k} leaves no block to cache in this {info.family} "
                             f"({info.block_count} blocks{half}); use a smaller shallow_blocks")
        self.compute_span = ComputeSpan(*self.span)
        self.reuse_span = ReuseSpan(*self.span)

    def block_action(self, step, block):
        if not self.span[0] <= block <= self.span[1]:
            return None
        return self.compute_span if step % self.interval == 0 else self.reuse_span

    def branch_action(self, step, block, branch):
        return COMPUTE_NO_STORE
