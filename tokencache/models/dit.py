"""DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers"), official layout.

State-dict keys and shapes are those of facebookresearch/DiT, so ``DiT-XL-2-256x256.pt`` and
``DiT-XL-2-512x512.pt`` load as they are, and the outputs equal the official ``models.py`` to
float32 rounding. The blocks route their branches through an attached cache context (see
:class:`tokencache.models.layers.CacheContext`); with none attached this is the plain forward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from tokencache.models.layers import (
    BlockCall,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    TransformerBlock,
    guided_channels,
    sincos_pos_embed_2d,
    unpatchify,
    xavier_init_linears,
)


class DiT(nn.Module):
    """Diffusion transformer: patchify → N adaLN-Zero blocks → final layer → unpatchify.

    Constructor keywords are the official ones. ``learn_sigma`` doubles the output channels
    (eps and the variance interpolation v of IDDPM's learned-range variance).
    """

    family = "DiT"

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True):
        super().__init__()
        self.input_size = input_size
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([TransformerBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.cache_context = None  # a tokencache.cache engine context while a method is attached
        self.initialize_weights()

    @property
    def num_tokens(self) -> int:
        return self.x_embedder.num_patches

    @property
    def block_count(self) -> int:
        """Number of transformer blocks a cache context sees (indices 0 … block_count−1)."""
        return len(self.blocks)

    @property
    def skip_partners(self) -> dict[int, int]:
        """Long skips {block that pushes: block that pops}: none in DiT."""
        return {}

    def initialize_weights(self) -> None:
        """DiT's init: xavier linears, fixed sin-cos pos_embed, zeroed adaLN and output layers."""
        xavier_init_linears(self)
        self.pos_embed.data.copy_(
            torch.from_numpy(sincos_pos_embed_2d(self.pos_embed.shape[-1], self.x_embedder.grid_size)).float()[None]
        )
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (self.final_layer.adaLN_modulation[-1].weight, self.final_layer.adaLN_modulation[-1].bias,
                  self.final_layer.linear.weight, self.final_layer.linear.bias):
            nn.init.zeros_(p)

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, c): the first block's input z (B, N, D) — patch embedding plus position — and the
        conditioning c (B, D) — timestep plus label embedding —, as :meth:`forward` computes them."""
        return self.x_embedder(x) + self.pos_embed, self.t_embedder(t) + self.y_embedder(y, self.training)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), t (B,) original 0–999 timesteps, y (B,) labels → (B, out_channels, H, W)."""
        ctx = self.cache_context
        x, c = self.embed(x, t, y)
        for i, block in enumerate(self.blocks):
            x = block(x, c) if ctx is None else ctx.block(i, BlockCall(block, i, c, ctx), x)
        x = self.final_layer(x, c)
        return unpatchify(x, self.patch_size, self.out_channels)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance: both halves of the batch are run on ``x[:B/2]``.

        ``y`` holds the class labels in its first half and the null class in its second; the
        guided eps ``uncond + s·(cond − uncond)`` is returned for both halves (official layout).
        """
        return cfg_forward(self, x, t, y, lambda half_t: cfg_scale)


def cfg_forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, scale_fn) -> torch.Tensor:
    """Shared CFG rule of DiT and MDT; ``scale_fn(t_half)`` gives the guidance scale.

    An attached cache context is told that each sample has two rows in this forward (row i and
    row i + B/2: ``rows_per_sample``), so that a method deciding per sample sees both.
    """
    half = x[: len(x) // 2]
    ctx = getattr(model, "cache_context", None)
    layout = ctx is not None and hasattr(ctx, "rows_per_sample")
    if layout:
        ctx.rows_per_sample = 2
    try:
        out = model.forward(torch.cat([half, half], dim=0), t, y)
    finally:
        if layout:
            ctx.rows_per_sample = 1
    n = guided_channels(model.in_channels)
    eps, rest = out[:, :n], out[:, n:]
    cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
    scale = scale_fn(t[: len(x) // 2])
    if torch.is_tensor(scale):
        scale = scale.view(-1, 1, 1, 1)
    guided = uncond + scale * (cond - uncond)
    return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)

