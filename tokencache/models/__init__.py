"""DiT, MDT and MDTv2 exact to the official code, presets by name, checkpoint loading."""
from tokencache.models.checkpoints import (
    OFFICIAL_WEIGHTS,
    CheckpointError,
    download_official,
    load_checkpoint,
    read_checkpoint,
)
from tokencache.models.dit import DiT
from tokencache.models.mdt import MDT, MDTv2
from tokencache.models.registry import FAMILIES, PRESETS, create_model, model_names

__all__ = [
    "DiT", "MDT", "MDTv2", "FAMILIES", "PRESETS", "OFFICIAL_WEIGHTS", "CheckpointError",
    "create_model", "model_names", "load_checkpoint", "read_checkpoint", "download_official",
]
