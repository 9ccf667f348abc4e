"""``full``: no caching, every branch of every step computed (the quality reference)."""
from dataclasses import dataclass

from tokencache.cache import CacheMethod, register_method


@register_method
@dataclass
class Full(CacheMethod):
    """No caching: the model runs untouched at every step (the reference for quality and cost)."""

    name = "full"
    passthrough = True
    role = "reference"
    noop = {}
