"""tokencache: token and feature caching for diffusion transformers, measured honestly."""
from tokencache._compat import ensure_torchvision_importable

ensure_torchvision_importable()

__version__ = "0.1.0"
