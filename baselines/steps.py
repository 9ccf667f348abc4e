"""``steps``: fewer sampling steps with the same sampler family, no caching.

The baseline every cache must beat: at equal cost, plain step reduction is often as good as
caching. ``ddim50`` with ``num_steps=25`` runs ``ddim25`` (the same respacing rule); the run's
MACs speed-up is against the sampler asked for.
"""
from dataclasses import dataclass
from typing import Optional

from tokencache.cache import CacheMethod, param, register_method
from tokencache.sampling import parse_sampler


@register_method
@dataclass
class Steps(CacheMethod):
    """Fewer sampling steps: the same sampler (DDPM/DDIM, same respacing rule) with num_steps steps."""

    name = "steps"
    passthrough = True
    role = "fewer-steps"
    noop = {"fraction": 1.0}
    search_space = {"fraction": (0.3, 0.4, 0.5, 0.6, 0.75)}  # the share of the sampler's steps kept
    num_steps: Optional[int] = param(None, "steps of the reduced sampler, e.g. 25 for ddim50 → ddim25 (overrides "
                                           "fraction)", min=1, max=1000)
    fraction: float = param(0.5, "the fraction of the sampler's steps kept (0.5: ddim50 → ddim25, ddpm250 → "
                                 "ddpm125), for configs with several samplers", min=0.0, max=1.0)

    def __post_init__(self):
        super().__post_init__()
        if self.fraction == 0 and self.num_steps is None:
            raise ValueError("steps: fraction must be above 0 (at least one step)")

    def resolved(self):
        """The parameters with ``num_steps`` the steps actually run (known after setup)."""
        return {**self.params(), "num_steps": self.info.num_steps if self.info is not None else self.num_steps}

    def transform_sampler(self, sampler):
        steps = self.num_steps if self.num_steps is not None else max(1, round(self.fraction * sampler.steps))
        if steps > sampler.steps:
            raise ValueError(f"steps: num_steps {steps} exceeds the {sampler.steps} steps of {sampler.name}")
        integer = "-int" if sampler.respacing.startswith("ddim") else ""
        return parse_sampler(f"{sampler.loop}{steps}{integer}")
