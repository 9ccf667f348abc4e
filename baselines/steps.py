"""``steps``: fewer sampling steps with the same sampler family, no caching.

The baseline every cache must beat (PROTOCOL.md, "Fair comparison"): at equal cost, plain step
reduction is often as good as caching. ``ddim50`` with ``num_steps=25`` runs ``ddim25``.
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
    num_steps: Optional[int] = param(None, "steps of the reduced sampler, e.g. 25 for ddim50 → ddim25", min=1, max=1000)
    fraction: Optional[float] = param(None, "or the fraction of the sampler's steps kept (0.5: ddim50 → ddim25, "
                                            "ddpm250 → ddpm125), for configs with several samplers", min=0.0, max=1.0)

    def __post_init__(self):
        super().__post_init__()
        if (self.num_steps is None) == (self.fraction is None):
            raise ValueError("steps: give exactly one of num_steps and fraction")

    def sampler_override(self, sampler_name: str) -> str:
        sampler = parse_sampler(sampler_name)
        steps = self.num_steps if self.num_steps is not None else max(1, round(self.fraction * sampler.steps))
        if steps > sampler.steps:
            raise ValueError(f"steps: num_steps {steps} exceeds the {sampler.steps} steps of {sampler.name}")
        integer = "-int" if sampler.respacing.startswith("ddim") else ""
        return parse_sampler(f"{sampler.loop}{steps}{integer}").name
