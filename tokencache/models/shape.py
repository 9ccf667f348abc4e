"""The sizes of a DiT / MDT / MDTv2 model that cost formulas and caching methods read.

A :class:`ModelShape` is what the MACs formulas (:mod:`tokencache.metrics.flops`) price and what
a method's ``overhead_macs(shape)`` receives from the cache engine. It describes the model, so it
lives with the models: the engine (in ``cache/``) and the metrics both read it, and neither has to
import the other for it.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModelShape:
    """The sizes the cost formulas need, read from a DiT / MDT / MDTv2 module.

    ``skip_blocks[i]`` tells whether block ``i`` (execution order, the engine's block index)
    has MDTv2's ``skip_linear``.
    """

    family: str
    tokens: int
    hidden: int
    heads: int
    mlp_hidden: int
    patch: int
    in_channels: int
    out_channels: int
    frequency_dim: int
    skip_blocks: tuple[bool, ...]

    @property
    def depth(self) -> int:
        return len(self.skip_blocks)


def execution_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks in the order the forward runs them (the cache engine's indices)."""
    if hasattr(model, "_all_blocks"):  # MDT / MDTv2 (the side-interpolater runs only in training)
        return list(model._all_blocks())
    return list(model.blocks)


def model_shape(model: nn.Module) -> ModelShape:
    """Sizes of ``model`` (works on a model built on the ``meta`` device: only shapes are read)."""
    blocks = execution_blocks(model)
    first = blocks[0]
    return ModelShape(
        family=type(model).__name__,
        tokens=int(model.x_embedder.num_patches),
        hidden=int(first.attn.proj.in_features),
        heads=int(first.attn.num_heads),
        mlp_hidden=int(first.mlp.fc1.out_features),
        patch=int(model.patch_size),
        in_channels=int(model.in_channels),
        out_channels=int(model.out_channels),
        frequency_dim=int(model.t_embedder.frequency_embedding_size),
        skip_blocks=tuple(b.skip_linear is not None for b in blocks),
    )
