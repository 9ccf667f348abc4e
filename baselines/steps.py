"""``steps``: fewer sampling steps with the same sampler family, no caching.

The baseline every cache must beat (PROTOCOL.md, "Fair comparison"): at equal cost, plain step
reduction is often as good as caching. ``ddim50`` with ``num_steps=25`` runs ``ddim25``.
"""
from dataclasses import dataclass
from tokencache.cache import CacheMethod, param, register_method
from tokencache.sampling import parse_sampler


@register_method
@dataclass
class Steps(CacheMethod):
    """Fewer sampling steps: the same sampler (DDPM/DDIM, same respacing rule) with num_steps steps."""

    name = "steps"
    passthrough = True
    num_steps: int = param(None, "steps of the reduced sampler, e.g. 25 for ddim50 → ddim25 (required)",
                           min=1, max=1000)

    def sampler_override(self, sampler_name: str) -> str:
        sampler = parse_sampler(sampler_name)
        if self.num_steps > sampler.steps:
            raise ValueError(f"steps: num_steps {self.num_steps} exceeds the {sampler.steps} steps of {sampler.name}")
        integer = "-int" if sampler.respacing.startswith("ddim") else ""
        return parse_sampler(f"{sampler.loop}{self.num_steps}{integer}").name
