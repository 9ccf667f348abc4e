"""``l2c``: Learning-to-Cache (Ma et al., arXiv 2406.01733; horseee/learning-to-cache @ d6cc7817, ``DiT/``).

A trained router (``tokencache train-router``, :func:`tokencache.cache.train_router`) holds
one logit per (step, block, branch). As in the official ``DiT/models/dynamic_models.py``
(lines 298–312) with ``STE`` (``router_models.py`` 154–155): steps with odd respaced index i
(counting down from T−1) run in full and store every branch; a step with even i reuses branch
(block, b) unless σ(logit[i, block, b]) > θ. The router must have been trained for this model
(configuration and weights) and this sampler.

What is ours: at an odd step count T the first step has an even index T−1; the official code
computes it (nothing is stored yet) and then indexes a routing it never filled, which crashes.
Here that step simply computes everything, and the routed steps are the even i < T−1.
"""
from dataclasses import dataclass

import torch

from tokencache.cache import COMPUTE, REUSE, CacheMethod, load_router, param, register_method
from tokencache.cache.router import routed_indices


@register_method
@dataclass
class L2C(CacheMethod):
    """Learning-to-Cache: odd steps full; on even steps reuse the branches a trained router marks (σ(w) ≤ θ)."""

    name = "l2c"
    router: str = param(None, "path of the router .pt written by `tokencache train-router` (required)")
    threshold: float = param(0.1, "θ: reuse a branch where σ(w) ≤ θ (official: 0.1)", min=0.0, max=1.0)

    def setup(self, info):
        super().setup(info)
        weights = torch.sigmoid(load_router(self.router, info.model, info.sampler_name)["logits"])
        self.reuse = [None] * info.num_steps
        for i in routed_indices(info.num_steps):
            self.reuse[info.num_steps - 1 - i] = (weights[i] <= self.threshold).tolist()

    def branch_action(self, step, block, branch):
        mask = self.reuse[step]
        if mask is not None and mask[block][0 if branch == "attn" else 1]:
            return REUSE
        return COMPUTE
