"""Building blocks shared by DiT and MDT, written so a caching engine can drive them.

Everything here is numerically the official DiT / MDT code (facebookresearch/DiT ``models.py``,
sail-sg/MDT ``masked_diffusion/models.py``, which build on timm's ``PatchEmbed``, ``Attention``
and ``Mlp``); the state-dict names and shapes are theirs. Two things are added, both inert unless
used:

* :class:`Attention` takes ``query_index`` — queries for a subset of tokens against keys and
  values of *all* tokens — and can return its attention probabilities. A token-caching method
  uses the first to recompute chosen tokens exactly, the second to score tokens (ToCa).
* :class:`TransformerBlock` exposes its two residual branches (attention, MLP) as functions of
  the block input and an optional token subset, each returning the branch output *before* the
  adaLN gate. If the model has a cache context attached, every branch and every block goes
  through it (``ctx.branch`` / ``ctx.block``); with none, the block is the official forward.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Protocol

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

BranchFn = Callable[..., torch.Tensor]


class CacheContext(Protocol):
    """What a model asks of a caching engine. Implemented in :mod:`tokencache.cache`.

    ``branch(block, name, fn, x)`` must return ``fn(x)``'s value (the pre-gate output of branch
    ``name`` of block ``block`` for all tokens), computed, reused or partly recomputed as the
    attached method decides. ``fn(x, tokens=…)`` computes the branch for the token subset
    ``tokens`` (B, k) only, ``fn(x, rows=…)`` for the batch rows ``rows`` of ``x`` only.
    ``block(index, call, x)`` must return ``call(x)``, the block's output (a :class:`BlockCall`).
    A context with a ``rows_per_sample`` attribute is told, for the duration of a CFG forward,
    that each sample has two rows, i and i + B/2 (:func:`tokencache.models.dit.cfg_forward`).
    """

    def branch(self, block: int, name: str, fn: BranchFn, x: torch.Tensor) -> torch.Tensor: ...

    def block(self, index: int, call: "BlockCall", x: torch.Tensor) -> torch.Tensor: ...


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` whose result for a sample never depends on the rest of the batch.

    CPU matrix-multiply kernels choose their code path, and so the rounding of each dot product,
    from the matrix shape: a linear layer over the B·T rows of a batch gives a sample other last
    bits when B·T is small or odd (one row per sample in the timestep embedder and the adaLN
    modulations, k rows per sample in a token subset). In inference on the CPU every sample gets
    its own product instead (one batched matmul against the shared weight, the same MACs), so a
    sample's result depends only on its own inputs, at any batch size and thread count. With
    gradients, and on other devices, it is the plain ``F.linear``.
    """
    if x.device.type != "cpu" or x.dim() < 2 or torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    rows = x.unsqueeze(1) if x.dim() == 2 else x.reshape(x.shape[0], -1, x.shape[-1])
    weights = weight.t().expand(rows.shape[0], -1, -1)
    if bias is None:
        out = torch.bmm(rows, weights)
    else:  # the bias added in the product's own pass, as addmm does for F.linear
        out = torch.baddbmm(bias.expand(rows.shape[0], rows.shape[1], -1), rows, weights)
    return out.reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) computed per sample: see :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x·(1 + scale) + shift, per sample, broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), index (B, k) → (B, k, D): the tokens ``index`` of each sample."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# --------------------------------------------------------------------------- embedders


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) → tokens (B, N, D) by a stride-p convolution (timm's PatchEmbed)."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.patch_size = (patch_size, patch_size)
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """t → 256-d sinusoid ([cos, sin], max period 10000) → Linear → SiLU → Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size
        self._freqs: Optional[torch.Tensor] = None  # frequencies(…) on the device last used

    @staticmethod
    def frequencies(dim: int, max_period: float = 10000) -> torch.Tensor:
        """The ``dim // 2`` sinusoid frequencies, float32, computed on the CPU as the official code does."""
        half = dim // 2
        return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000,
                           freqs: Optional[torch.Tensor] = None) -> torch.Tensor:
        if freqs is None:
            freqs = TimestepEmbedder.frequencies(dim, max_period).to(t.device)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # The frequencies are copied to t's device once, not at every call: a host→GPU copy makes
        # the host wait for the GPU, a stall at every step of the sampling loop. Not a buffer, so
        # that casting the model to bfloat16 cannot round them (t·freq reaches 999 rad).
        if self._freqs is None or self._freqs.device != t.device:
            self._freqs = self.frequencies(self.frequency_embedding_size).to(t.device)
        freq = self.timestep_embedding(t, self.frequency_embedding_size, freqs=self._freqs)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label → vector; row ``num_classes`` is the null class of classifier-free guidance.

    In training, labels are replaced by the null class with probability ``dropout_prob``.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


# --------------------------------------------------------------------------- attention


class RelativePositionBias(nn.Module):
    """BEiT relative position bias as MDT uses it: a learned (2w−1)²+3 × heads table.

    ``forward()`` returns the (heads, N, N) bias added to the attention logits. The three extra
    rows are BEiT's class-token entries, unused here but part of the checkpoint layout.
    """

    def __init__(self, window: int, num_heads: int):
        super().__init__()
        self.window = window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2 + 3, num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2)
        index = (rel[..., 0] + window - 1) * (2 * window - 1) + (rel[..., 1] + window - 1)
        self.register_buffer("relative_position_index", index)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self) -> torch.Tensor:
        n = self.window**2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous()


class Attention(nn.Module):
    """Multi-head self-attention (timm layout: ``qkv``, ``proj``), optional relative bias (MDT).

    ``forward(x, query_index=None, token_ids=None, return_attention=False)``:

    * ``query_index`` (B, k): compute outputs only for these tokens of ``x``; keys and values
      still come from all tokens, so each chosen token gets exactly its full-computation value.
      Only the query rows of the qkv projection are computed for them.
    * ``token_ids`` (B, n): positions of ``x``'s tokens in the full grid when ``x`` holds only
      some of them (MDT's masked training); selects the matching relative-bias entries.
    * ``return_attention``: also return the softmax probabilities (B, heads, q, n); this path
      uses an explicit softmax, the others use fused ``scaled_dot_product_attention``.
    * ``return_values``: also return the value heads (B, heads, n, head_dim), after the
      probabilities when both are asked for (for token scores from the values).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, rel_pos_window: Optional[int] = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = Linear(dim, dim)
        self.rel_pos_bias = RelativePositionBias(rel_pos_window, num_heads) if rel_pos_window else None

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def _bias(self, batch: int, query_index, token_ids) -> Optional[torch.Tensor]:
        if self.rel_pos_bias is None:
            return None
        bias = self.rel_pos_bias()  # (H, N, N)
        if token_ids is None and query_index is None:
            return bias.unsqueeze(0)
        bias = bias.unsqueeze(0).expand(batch, -1, -1, -1)
        heads = bias.shape[1]
        if token_ids is not None:
            rows = token_ids[:, None, :, None].expand(-1, heads, -1, bias.shape[-1])
            bias = torch.gather(bias, 2, rows)
            cols = token_ids[:, None, None, :].expand(-1, heads, bias.shape[2], -1)
            bias = torch.gather(bias, 3, cols)
        if query_index is not None:
            rows = query_index[:, None, :, None].expand(-1, heads, -1, bias.shape[-1])
            bias = torch.gather(bias, 2, rows)
        return bias

    def forward(
        self,
        x: torch.Tensor,
        query_index: Optional[torch.Tensor] = None,
        token_ids: Optional[torch.Tensor] = None,
        return_attention: bool = False,
        return_values: bool = False,
    ):
        b, n, d = x.shape
        if query_index is None:
            q, k, v = self.qkv(x).split(d, dim=-1)
        else:
            weight, bias = self.qkv.weight, self.qkv.bias
            q = linear(gather_tokens(x, query_index), weight[:d], None if bias is None else bias[:d])
            k, v = linear(x, weight[d:], None if bias is None else bias[d:]).split(d, dim=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        attn_bias = self._bias(b, query_index, token_ids)
        if return_attention:
            logits = (q * self.scale) @ k.transpose(-2, -1)
            if attn_bias is not None:
                logits = logits + attn_bias
            probs = logits.softmax(dim=-1)
            out = probs @ v
        else:
            mask = None if attn_bias is None else attn_bias.to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.proj(out.transpose(1, 2).reshape(b, -1, d))
        if not (return_attention or return_values):
            return out
        return (out,) + ((probs,) if return_attention else ()) + ((v,) if return_values else ())


class TanhGELU(nn.Module):
    """GELU with the tanh approximation, the activation of DiT's and MDT's MLPs.

    ½x(1 + tanh u), u = √(2/π)(x + 0.044715x³), is x·σ(2u), since ½(1 + tanh u) = σ(2u). On the
    reference CPU (AVX2) that form, in place when no gradient is needed, takes 17 ms on a
    (25600, 256) tensor against 24 ms for PyTorch's tanh-GELU kernel, 8% of a DiT-digits forward
    at batch 400; it agrees with the kernel to float32 rounding (tests/test_models.py). On other
    devices PyTorch's fused kernel is used.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return F.gelu(x, approximate="tanh")
        if torch.is_grad_enabled() and x.requires_grad:
            return x * torch.sigmoid(torch.addcmul(x, x * x, x, value=0.044715).mul_(2 * math.sqrt(2 / math.pi)))
        u = (x * x).mul_(0.044715).add_(1.0).mul_(x).mul_(2 * math.sqrt(2 / math.pi))  # one buffer: 2u
        return u.sigmoid_().mul_(x)


class Mlp(nn.Module):
    """fc1 → GELU(tanh) → fc2, hidden 4·D (timm's Mlp as DiT configures it)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = TanhGELU()
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# --------------------------------------------------------------------------- blocks


class TransformerBlock(nn.Module):
    """adaLN-Zero block of DiT; with ``rel_pos_window`` and ``skip`` it is MDT's block.

    Output = x + gate_msa·Attn(modulate(LN(x))) then + gate_mlp·MLP(modulate(LN(x))). With
    ``skip`` (MDTv2's long skips), the input is first ``skip_linear(cat[x, skip])``.
    ``attn_branch``/``mlp_branch`` return the pre-gate branch outputs (what caching methods
    store and re-gate with the current step's gates); ``forward`` hands them to the engine as
    closures over this step's adaLN shift and scale.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
                 rel_pos_window: Optional[int] = None, skip: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, rel_pos_window=rel_pos_window)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden_size, 6 * hidden_size, bias=True))
        self.skip_linear = Linear(2 * hidden_size, hidden_size) if skip else None

    def attn_branch(self, h, shift, scale, tokens=None, token_ids=None, return_attention=False, return_values=False):
        """Attention branch before its gate: Attn(modulate(LN(h))), optionally for ``tokens`` only.

        A method (not a closure) so that :func:`tokencache.models.compile.compile_branches` can
        compile it once for every block, leaving the caching engine between branches eager.
        """
        return self.attn(modulate(self.norm1(h), shift, scale), query_index=tokens, token_ids=token_ids,
                         return_attention=return_attention, return_values=return_values)

    def mlp_branch(self, h, shift, scale, tokens=None):
        """MLP branch before its gate: MLP(modulate(LN(h))), on ``tokens`` only when given."""
        if tokens is not None:
            h = gather_tokens(h, tokens)
        return self.mlp(modulate(self.norm2(h), shift, scale))

    def attention_input(self, x, c, skip=None):
        """The timestep-modulated input of the attention branch, modulate(LN(x), shift, scale)."""
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        shift_msa, scale_msa = self.adaLN_modulation(c).chunk(6, dim=1)[:2]
        return modulate(self.norm1(x), shift_msa, scale_msa)

    def forward(self, x, c, skip=None, token_ids=None, ctx: Optional[CacheContext] = None, index: int = 0):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)

        def attn_branch(h, tokens=None, return_attention=False, rows=None, return_values=False):
            shift, scale = (shift_msa, scale_msa) if rows is None else (shift_msa[rows], scale_msa[rows])
            return self.attn_branch(h, shift, scale, tokens, token_ids, return_attention, return_values)

        def mlp_branch(h, tokens=None, rows=None):
            shift, scale = (shift_mlp, scale_mlp) if rows is None else (shift_mlp[rows], scale_mlp[rows])
            return self.mlp_branch(h, shift, scale, tokens)

        if ctx is None:
            x = x + gate_msa.unsqueeze(1) * attn_branch(x)
            return x + gate_mlp.unsqueeze(1) * mlp_branch(x)
        x = x + gate_msa.unsqueeze(1) * ctx.branch(index, "attn", attn_branch, x)
        return x + gate_mlp.unsqueeze(1) * ctx.branch(index, "mlp", mlp_branch, x)


class BlockCall:
    """One block of one forward, as a cache context sees it.

    ``call(h)`` runs the block on ``h`` with its side inputs — the conditioning ``c``, MDTv2's
    long ``skip``, the decoder position embedding ``add_pos`` added to its input, MDT's training
    ``token_ids`` — and ``call(h, rows)`` on the batch rows ``rows`` (int64 (b,)) only, where
    ``h`` holds just those rows. ``attention_input(h)`` is the block's timestep-modulated
    attention input (what TeaCache measures). The model builds one per block and forward; it
    knows nothing of what the context decides.
    """

    __slots__ = ("block", "index", "c", "skip", "add_pos", "token_ids", "ctx")

    def __init__(self, block: TransformerBlock, index: int, c: torch.Tensor, ctx: CacheContext,
                 skip: Optional[torch.Tensor] = None, add_pos: Optional[torch.Tensor] = None,
                 token_ids: Optional[torch.Tensor] = None):
        self.block, self.index, self.c, self.ctx = block, index, c, ctx
        self.skip, self.add_pos, self.token_ids = skip, add_pos, token_ids

    def _inputs(self, h, rows):
        c, skip = self.c, self.skip
        if rows is not None:
            c = c[rows]
            skip = None if skip is None else skip[rows]
        if self.add_pos is not None:
            h = h + self.add_pos
        return h, c, skip

    def __call__(self, h: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        h, c, skip = self._inputs(h, rows)
        return self.block(h, c, skip=skip, token_ids=self.token_ids, ctx=self.ctx, index=self.index)

    def attention_input(self, h: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        h, c, skip = self._inputs(h, rows)
        return self.block.attention_input(h, c, skip)


class FinalLayer(nn.Module):
    """LayerNorm → adaLN (shift, scale) → Linear to p²·out_channels per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# --------------------------------------------------------------------------- position embeddings


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE's fixed 2-D sin-cos embedding (grid_size², embed_dim), float64.

    Half of the channels encode the column coordinate, half the row ("w goes first" in MAE's
    meshgrid, whose first output is then used for the first half), each as [sin, cos] over
    frequencies 1/10000^(2i/d).
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs hidden size divisible by 4, got {embed_dim}")
    coords = np.arange(grid_size, dtype=np.float32)
    grid_w, grid_h = np.meshgrid(coords, coords)  # first output varies along columns

    def embed_1d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([embed_1d(embed_dim // 2, grid_w), embed_1d(embed_dim // 2, grid_h)], axis=1)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """Tokens (B, N, p²·C) → image (B, C, H, W) on a square grid.

    The same values as the official ``einsum("nhwpqc->nchpwq")``, written as a permute so that
    ``torch.jit.trace`` (fvcore's MAC counting) follows it and counts no arithmetic for it.
    """
    b, n, _ = x.shape
    h = math.isqrt(int(n))
    if h * h != n:
        raise ValueError(f"{n} tokens do not form a square grid")
    x = x.reshape(b, h, h, patch_size, patch_size, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, h * patch_size, h * patch_size)


def guided_channels(in_channels: int) -> int:
    """How many output channels classifier-free guidance applies to.

    The official DiT and MDT code guide only the first 3 of the 4 latent eps channels ("for
    exact reproducibility reasons"); we keep that for 4-channel models so outputs match the
    official checkpoints. For other layouts (e.g. the 1-channel pixel-space digits testbed),
    "the first 3 channels" would mix eps with the variance output, so all eps channels are
    guided there.
    """
    return 3 if in_channels == 4 else in_channels


def xavier_init_linears(module: nn.Module) -> None:
    """DiT's basic init: xavier-uniform weights and zero biases for every Linear."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
