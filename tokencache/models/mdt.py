"""MDT and MDTv2 (Gao et al., "Masked Diffusion Transformer is a Strong Image Synthesizer").

Official layout of sail-sg/MDT: ``MDT`` (branch mdtv1: one flat list of blocks, the decoder
position embedding added before block ``depth − decode_layer``) and ``MDTv2`` (U-ViT-style long
skips: ``en_inblocks`` push, ``en_outblocks`` pop through ``skip_linear``; ``de_blocks`` all take
the patch embedding as their skip). Every attention carries a BEiT relative position bias.

Training masks a random fraction of tokens (v2: a ratio drawn in [r, r+0.2] per batch) and the
side-interpolater (``sideblocks``) fills them back in before the decoder; at inference nothing
is masked and the side block is not run. ``forward(..., enable_mask=True)`` is the training path.

Block indices seen by a cache context follow execution order: v1 ``blocks`` 0…depth−1; v2
``en_inblocks`` 0…h−1, ``en_outblocks`` h…2h−1, ``de_blocks`` 2h…2h+decode_layer−1. The
decoder position embedding is added by the first decoder block's call (``BlockCall.add_pos``), so a span of
blocks reused through its residual (DeepCache) carries it with the rest.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from tokencache.models.dit import cfg_forward
from tokencache.models.layers import (
    BlockCall,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    TransformerBlock,
    gather_tokens,
    sincos_pos_embed_2d,
    unpatchify,
    xavier_init_linears,
)


def power_cosine_cfg_scale(cfg_scale: float, t: torch.Tensor, diffusion_steps: int = 1000,
                           scale_pow: float = 4.0) -> torch.Tensor:
    """MDT's guidance ramp: cfg(t) = (s − 1)·(1 − cos(((1 − t/T)^pow)·π))/2 + 1.

    ``t`` is the original 0–999 timestep, so guidance is ~1 at high noise and ~s near t = 0.
    """
    ramp = (1 - torch.cos(((1 - t / diffusion_steps) ** scale_pow) * math.pi)) / 2
    return (cfg_scale - 1) * ramp + 1


class _MDTBase(nn.Module):
    """What MDT and MDTv2 share: embedders, masking, side-interpolater, CFG."""

    family = "MDT"

    def __init__(self, input_size, patch_size, in_channels, hidden_size, num_heads, class_dropout_prob,
                 num_classes, learn_sigma, mask_ratio, decode_layer):
        super().__init__()
        if decode_layer is None:
            raise ValueError("MDT needs decode_layer (official: 2 for MDT-XL/2 v1, 4 for MDTv2)")
        self.input_size = input_size
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.decode_layer = int(decode_layer)
        self.mask_ratio = None if mask_ratio is None else float(mask_ratio)
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        n = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, n, hidden_size))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n, hidden_size))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size), requires_grad=mask_ratio is not None)
        self.cache_context = None

    def _block(self, hidden_size, num_heads, mlp_ratio, skip=False) -> TransformerBlock:
        return TransformerBlock(hidden_size, num_heads, mlp_ratio, rel_pos_window=self.x_embedder.grid_size, skip=skip)

    @property
    def num_tokens(self) -> int:
        return self.x_embedder.num_patches

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, c): the first block's input z (B, N, D) — patch embedding plus position, before any
        masking — and the conditioning c (B, D) — timestep plus label embedding —, as :meth:`forward`
        computes them."""
        return self.x_embedder(x) + self.pos_embed, self.t_embedder(t) + self.y_embedder(y, self.training)

    def initialize_weights(self) -> None:
        """MDT's init: as DiT, plus learnable sin-cos pos/decoder embeddings and mask token."""
        xavier_init_linears(self)
        grid = self.x_embedder.grid_size
        for p in (self.pos_embed, self.decoder_pos_embed):
            p.data.copy_(torch.from_numpy(sincos_pos_embed_2d(p.shape[-1], grid)).float()[None])
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in list(self._all_blocks()) + list(self.sideblocks):
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (self.final_layer.adaLN_modulation[-1].weight, self.final_layer.adaLN_modulation[-1].bias,
                  self.final_layer.linear.weight, self.final_layer.linear.bias):
            nn.init.zeros_(p)
        if self.mask_ratio is not None:
            nn.init.normal_(self.mask_token, std=0.02)

    @property
    def block_count(self) -> int:
        return len(list(self._all_blocks()))

    @property
    def skip_partners(self) -> dict[int, int]:
        """Long skips {block that pushes: block that pops}: MDTv2 pairs encoder block j with 2h−1−j."""
        half = getattr(self, "half_depth", None)
        return {} if half is None else {j: 2 * half - 1 - j for j in range(half)}

    def random_masking(self, x: torch.Tensor, mask_ratio):
        """Keep a random ``1 − mask_ratio`` of each sample's tokens (MAE's argsort of noise).

        Returns the kept tokens, the mask (1 = removed) in grid order, the inverse permutation
        and the kept token positions.
        """
        n, length, d = x.shape
        keep = int(length * (1 - mask_ratio))
        order = torch.argsort(torch.rand(n, length, device=x.device), dim=1)
        restore = torch.argsort(order, dim=1)
        ids_keep = order[:, :keep]
        mask = torch.ones(n, length, device=x.device)
        mask[:, :keep] = 0
        return gather_tokens(x, ids_keep), torch.gather(mask, 1, restore), restore, ids_keep

    def forward_side_interpolater(self, x, c, mask, ids_restore):
        """Fill masked positions with the mask token, add the decoder embedding, run the side block;
        only masked positions take the side block's output (the "masked shortcut")."""
        tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] - x.shape[1], 1)
        x = torch.gather(torch.cat([x, tokens], dim=1), 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = x + self.decoder_pos_embed
        before = x
        for side in self.sideblocks:
            x = side(x, c)
        mask = mask.unsqueeze(-1)
        return x * mask + (1 - mask) * before

    def _run(self, index: int, block: TransformerBlock, x: torch.Tensor, c: torch.Tensor, skip=None, add_pos=None,
             token_ids=None) -> torch.Tensor:
        """Block ``index`` on ``x``, through the cache context when one is attached."""
        call = BlockCall(block, index, c, self.cache_context, skip=skip, add_pos=add_pos, token_ids=token_ids)
        return call(x) if self.cache_context is None else self.cache_context.block(index, call, x)

    def forward_with_cfg(self, x, t, y, cfg_scale=None, diffusion_steps: int = 1000, scale_pow: float = 4.0):
        """CFG with MDT's power-cosine ramp; ``cfg_scale=None`` runs the plain forward."""
        if cfg_scale is None:
            return self.forward(x, t, y)
        return cfg_forward(self, x, t, y, lambda th: power_cosine_cfg_scale(cfg_scale, th, diffusion_steps, scale_pow))


class MDT(_MDTBase):
    """MDT v1: flat ``blocks``; decoder position embedding before block ``depth − decode_layer``."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, mask_ratio=None,
                 decode_layer=None):
        super().__init__(input_size, patch_size, in_channels, hidden_size, num_heads, class_dropout_prob,
                         num_classes, learn_sigma, mask_ratio, decode_layer)
        self.blocks = nn.ModuleList([self._block(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.sideblocks = nn.ModuleList([self._block(hidden_size, num_heads, mlp_ratio)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def _all_blocks(self):
        return self.blocks

    def forward(self, x, t, y, enable_mask: bool = False):
        x, c = self.embed(x, t, y)
        masked = self.mask_ratio is not None and enable_mask
        ids_keep = None
        if masked:
            x, mask, ids_restore, ids_keep = self.random_masking(x, self.mask_ratio)
        border = len(self.blocks) - self.decode_layer
        for i, block in enumerate(self.blocks):
            if i == border and masked:
                x = self.forward_side_interpolater(x, c, mask, ids_restore)
                ids_keep = None
            add_pos = self.decoder_pos_embed if (i == border and not masked) else None
            x = self._run(i, block, x, c, add_pos=add_pos, token_ids=ids_keep)
        return unpatchify(self.final_layer(x, c), self.patch_size, self.out_channels)


class MDTv2(_MDTBase):
    """MDTv2: encoder in/out blocks with long skips, decoder blocks fed the input skip."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, mask_ratio=None,
                 decode_layer=4):
        super().__init__(input_size, patch_size, in_channels, hidden_size, num_heads, class_dropout_prob,
                         num_classes, learn_sigma, mask_ratio, decode_layer)
        half = (depth - self.decode_layer) // 2
        self.half_depth = half
        self.en_inblocks = nn.ModuleList([self._block(hidden_size, num_heads, mlp_ratio) for _ in range(half)])
        self.en_outblocks = nn.ModuleList([self._block(hidden_size, num_heads, mlp_ratio, skip=True) for _ in range(half)])
        self.de_blocks = nn.ModuleList(
            [self._block(hidden_size, num_heads, mlp_ratio, skip=True) for _ in range(self.decode_layer)]
        )
        self.sideblocks = nn.ModuleList([self._block(hidden_size, num_heads, mlp_ratio)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def _all_blocks(self):
        return list(self.en_inblocks) + list(self.en_outblocks) + list(self.de_blocks)

    def forward(self, x, t, y, enable_mask: bool = False):
        x, c = self.embed(x, t, y)
        input_skip = x
        masked = self.mask_ratio is not None and enable_mask
        ids_keep = None
        if masked:
            ratio = torch.rand(1, device=x.device) * 0.2 + self.mask_ratio  # v2: r ~ U[mask_ratio, +0.2]
            x, mask, ids_restore, ids_keep = self.random_masking(x, ratio)
        skips = []
        index = 0
        for block in self.en_inblocks:
            x = self._run(index, block, x, c, token_ids=ids_keep)
            skips.append(x)
            index += 1
        for block in self.en_outblocks:
            skip = skips.pop()
            x = self._run(index, block, x, c, skip=skip, token_ids=ids_keep)
            index += 1
        if masked:
            x = self.forward_side_interpolater(x, c, mask, ids_restore)
        for j, block in enumerate(self.de_blocks):
            add_pos = self.decoder_pos_embed if (j == 0 and not masked) else None
            x = self._run(index, block, x, c, skip=input_skip, add_pos=add_pos)
            index += 1
        return unpatchify(self.final_layer(x, c), self.patch_size, self.out_channels)
