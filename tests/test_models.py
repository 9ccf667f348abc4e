"""Tests of tokencache.models against the published layouts and formulas.

Nothing here imports the official DiT / MDT code. The expected state-dict layouts are written
out from the constructor arguments (the naming scheme of facebookresearch/DiT and sail-sg/MDT),
and the reference forwards below are re-implemented from the papers' formulas with plain torch
ops in float64 (LayerNorm, adaLN modulation, explicit softmax attention, BEiT relative bias
indexed by hand, tanh-GELU MLP, long skips, final layer, unpatchify).
"""
import functools
import math

import numpy as np
import pytest
import torch

import tokencache  # noqa: F401  (torchvision import fix before anything imports timm)
from tokencache.models import FAMILIES, PRESETS, DiT, MDT, MDTv2, create_model
from tokencache.models.layers import Attention, TanhGELU, guided_channels, sincos_pos_embed_2d
from tokencache.models.mdt import power_cosine_cfg_scale


SMALL = dict(input_size=8, patch_size=2, num_classes=10, hidden_size=32, depth=4, num_heads=4)


def randomise(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Non-trivial values for every parameter (the official init zeroes adaLN and output layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)
    return model


def build(family: str, dtype=torch.float64, seed: int = 0, **kw) -> torch.nn.Module:
    args = dict(SMALL, in_channels=4)
    if family == "MDT":
        args["decode_layer"] = 2
    elif family == "MDTv2":
        args.update(depth=6, decode_layer=2)  # 2 in-blocks, 2 out-blocks, 2 decoder blocks
    args.update(kw)
    torch.manual_seed(seed)
    return randomise(create_model(family, **args), seed).to(dtype).eval()


def inputs(model, batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g, dtype=dtype)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, model.num_classes + 1, (batch,), generator=g)  # includes the null class
    return x, t, y


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ----------------------------------------------------------------------------- layouts


def expected_layout(family: str, kw: dict) -> dict:
    """Key → shape of the official state dict, from the constructor keywords alone."""
    D, p = kw["hidden_size"], kw["patch_size"]
    C = kw.get("in_channels", 4)
    out = 2 * C if kw.get("learn_sigma", True) else C
    g = kw.get("input_size", 32) // p
    N = g * g
    heads = kw["num_heads"]
    classes = kw.get("num_classes", 1000)
    mdt = family in ("MDT", "MDTv2")
    shapes = {
        "x_embedder.proj.weight": (D, C, p, p), "x_embedder.proj.bias": (D,),
        "pos_embed": (1, N, D),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (classes + 1, D),
        "final_layer.linear.weight": (p * p * out, D), "final_layer.linear.bias": (p * p * out,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }

    def block(prefix, skip=False):
        shapes.update({
            f"{prefix}.attn.qkv.weight": (3 * D, D), f"{prefix}.attn.qkv.bias": (3 * D,),
            f"{prefix}.attn.proj.weight": (D, D), f"{prefix}.attn.proj.bias": (D,),
            f"{prefix}.mlp.fc1.weight": (4 * D, D), f"{prefix}.mlp.fc1.bias": (4 * D,),
            f"{prefix}.mlp.fc2.weight": (D, 4 * D), f"{prefix}.mlp.fc2.bias": (D,),
            f"{prefix}.adaLN_modulation.1.weight": (6 * D, D), f"{prefix}.adaLN_modulation.1.bias": (6 * D,),
        })
        if mdt:
            shapes[f"{prefix}.attn.rel_pos_bias.relative_position_bias_table"] = ((2 * g - 1) ** 2 + 3, heads)
            shapes[f"{prefix}.attn.rel_pos_bias.relative_position_index"] = (N, N)
        if skip:
            shapes[f"{prefix}.skip_linear.weight"] = (D, 2 * D)
            shapes[f"{prefix}.skip_linear.bias"] = (D,)

    depth = kw["depth"]
    if family in ("DiT", "MDT"):
        for i in range(depth):
            block(f"blocks.{i}")
    else:
        decode = kw["decode_layer"]
        half = (depth - decode) // 2
        for i in range(half):
            block(f"en_inblocks.{i}")
            block(f"en_outblocks.{i}", skip=True)
        for i in range(decode):
            block(f"de_blocks.{i}", skip=True)
    if mdt:
        shapes["decoder_pos_embed"] = (1, N, D)
        shapes["mask_token"] = (1, 1, D)
        block("sideblocks.0")
    return shapes


def test_presets_cover_the_official_names():
    names = set(PRESETS)
    for size in ("XL", "L", "B", "S"):
        for p in (2, 4, 8):
            assert f"DiT-{size}/{p}" in names and f"MDT-{size}/{p}" in names
        assert f"MDTv2-{size}/2" in names
    assert PRESETS["DiT-XL/2"][1]["depth"] == 28 and PRESETS["DiT-XL/2"][1]["hidden_size"] == 1152
    assert PRESETS["DiT-S/4"][1]["num_heads"] == 6 and PRESETS["DiT-B/8"][1]["hidden_size"] == 768
    assert PRESETS["MDT-XL/2"][1]["decode_layer"] == 2 and PRESETS["MDTv2-XL/2"][1]["decode_layer"] == 4


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_with_the_official_state_dict_layout(name):
    family, kw = PRESETS[name]
    with torch.device("meta"):
        model = create_model(name)
    assert type(model) is FAMILIES[family]
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = expected_layout(family, kw)
    assert set(got) == set(want), (sorted(set(got) - set(want))[:5], sorted(set(want) - set(got))[:5])
    assert got == want


def test_layout_follows_overrides_on_a_real_small_model():
    kw = dict(input_size=16, patch_size=4, in_channels=1, num_classes=7, hidden_size=24, depth=7, num_heads=3,
              decode_layer=3, learn_sigma=False)
    model = create_model("MDTv2", **kw)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_layout("MDTv2", kw)
    assert model.block_count == 2 * ((7 - 3) // 2) + 3


@pytest.mark.parametrize("name,count", [
    ("DiT-XL/2", 675_129_632), ("MDT-XL/2", 699_778_144), ("MDTv2-XL/2", 742_263_904),
])
def test_parameter_counts_of_the_published_models(name, count):
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == count


def test_unknown_names_and_keywords_are_refused():
    with pytest.raises(ValueError, match="unknown model"):
        create_model("DiT-XXL/2")
    with pytest.raises(ValueError, match="unknown keyword"):
        create_model("DiT-S/2", n_layers=3)


# ----------------------------------------------------------------------------- independent reference


def ref_timestep_embedding(t):
    """GLIDE/ADM sinusoid, [cos, sin], max period 10000. Computed in float32 exactly as the
    official code does (its frequencies and arguments are float32 by construction), then
    widened: the rest of the reference is float64."""
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1).double()


def linear(sd, name, x):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def silu(x):
    return x / (1 + torch.exp(-x))


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def layer_norm(x):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-6)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


@functools.lru_cache(maxsize=None)
def beit_index(g):
    """Table row of each token pair: token n sits at row n // g, column n % g; the pair (i, j)
    uses row (dr + g − 1)·(2g − 1) + (dc + g − 1) with dr, dc = i − j per axis."""
    n = g * g
    index = torch.empty(n, n, dtype=torch.long)
    for i in range(n):
        for j in range(n):
            dr, dc = i // g - j // g, i % g - j % g
            index[i, j] = (dr + g - 1) * (2 * g - 1) + (dc + g - 1)
    return index


def beit_bias(table, g):
    """(heads, N, N) relative position bias looked up by hand."""
    return table[beit_index(g)].permute(2, 0, 1)


def ref_attention(sd, name, x, heads, bias=None):
    B, N, D = x.shape
    dh = D // heads
    qkv = linear(sd, f"{name}.qkv", x)
    q, k, v = (qkv[..., i * D:(i + 1) * D].reshape(B, N, heads, dh).transpose(1, 2) for i in range(3))
    logits = q @ k.transpose(-1, -2) / math.sqrt(dh)
    if bias is not None:
        logits = logits + bias
    e = torch.exp(logits - logits.max(-1, keepdim=True).values)
    probs = e / e.sum(-1, keepdim=True)
    return linear(sd, f"{name}.proj", (probs @ v).transpose(1, 2).reshape(B, N, D))


def ref_block(sd, name, x, c, heads, g=None, skip=None):
    if skip is not None:
        x = linear(sd, f"{name}.skip_linear", torch.cat([x, skip], dim=-1))
    mod = linear(sd, f"{name}.adaLN_modulation.1", silu(c))
    D = x.shape[-1]
    sh1, sc1, g1, sh2, sc2, g2 = (mod[:, i * D:(i + 1) * D] for i in range(6))
    bias = None if g is None else beit_bias(sd[f"{name}.attn.rel_pos_bias.relative_position_bias_table"], g)
    x = x + g1[:, None] * ref_attention(sd, f"{name}.attn", modulate(layer_norm(x), sh1, sc1), heads, bias)
    h = gelu_tanh(linear(sd, f"{name}.mlp.fc1", modulate(layer_norm(x), sh2, sc2)))
    return x + g2[:, None] * linear(sd, f"{name}.mlp.fc2", h)


def ref_embed(sd, x, t, y, p):
    B, C, H, W = x.shape
    g = H // p
    w = sd["x_embedder.proj.weight"]  # (D, C, p, p): a linear map of each p×p×C patch
    patches = x.reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * p * p)
    tokens = patches @ w.reshape(w.shape[0], -1).T + sd["x_embedder.proj.bias"] + sd["pos_embed"]
    temb = linear(sd, "t_embedder.mlp.2", silu(linear(sd, "t_embedder.mlp.0", ref_timestep_embedding(t))))
    return tokens, temb + sd["y_embedder.embedding_table.weight"][y]


def ref_final(sd, x, c, p, out_ch):
    shift, scale = linear(sd, "final_layer.adaLN_modulation.1", silu(c)).chunk(2, dim=1)
    tok = linear(sd, "final_layer.linear", modulate(layer_norm(x), shift, scale))  # (B, N, p·p·C)
    B, N, _ = tok.shape
    g = int(round(N**0.5))
    img = torch.empty(B, out_ch, g * p, g * p, dtype=tok.dtype)
    for n in range(N):  # token n covers rows (n // g)·p…, columns (n % g)·p…, ordered (i, j, c)
        r, col = n // g, n % g
        img[:, :, r * p:(r + 1) * p, col * p:(col + 1) * p] = tok[:, n].reshape(B, p, p, out_ch).permute(0, 3, 1, 2)
    return img


def ref_forward(model, x, t, y):
    sd = {k: v.double() for k, v in model.state_dict().items()}
    p, heads, out_ch = model.patch_size, model.num_heads, model.out_channels
    x, c = ref_embed(sd, x.double(), t, y, p)
    if isinstance(model, DiT):
        for i in range(len(model.blocks)):
            x = ref_block(sd, f"blocks.{i}", x, c, heads)
    elif isinstance(model, MDTv2):
        g = model.input_size // p
        input_skip, skips = x, []
        for i in range(len(model.en_inblocks)):
            x = ref_block(sd, f"en_inblocks.{i}", x, c, heads, g)
            skips.append(x)
        for i in range(len(model.en_outblocks)):
            x = ref_block(sd, f"en_outblocks.{i}", x, c, heads, g, skip=skips.pop())
        x = x + sd["decoder_pos_embed"]
        for i in range(len(model.de_blocks)):
            x = ref_block(sd, f"de_blocks.{i}", x, c, heads, g, skip=input_skip)
    else:
        g = model.input_size // p
        depth = len(model.blocks)
        for i in range(depth):
            if i == depth - model.decode_layer:
                x = x + sd["decoder_pos_embed"]
            x = ref_block(sd, f"blocks.{i}", x, c, heads, g)
    return ref_final(sd, x, c, p, out_ch)


@pytest.mark.parametrize("family", ["DiT", "MDT", "MDTv2"])
@pytest.mark.parametrize("in_channels,patch", [(4, 2), (1, 1)])
def test_forward_equals_the_formulas_in_float64(family, in_channels, patch):
    model = build(family, in_channels=in_channels, patch_size=patch, seed=3)
    x, t, y = inputs(model)
    with torch.no_grad():
        got = model(x, t, y)
    want = ref_forward(model, x, t, y)
    assert got.shape == (4, 2 * in_channels, 8, 8)
    assert want.abs().max() > 0.1
    assert rel_err(got, want) < 1e-10


def test_the_reference_notices_a_wrong_model():
    """The float64 reference is sensitive: perturbing one weight of one block breaks equality."""
    model = build("MDTv2", seed=4)
    x, t, y = inputs(model)
    with torch.no_grad():
        want = ref_forward(model, x, t, y)
        model.de_blocks[1].attn.rel_pos_bias.relative_position_bias_table[5, 0] += 1e-3
        assert rel_err(model(x, t, y), want) > 1e-8


def test_stored_relative_position_index_is_beits():
    model = build("MDT", seed=0)
    g = model.input_size // model.patch_size
    table = torch.arange(((2 * g - 1) ** 2 + 3) * 1.0)[:, None]  # row number as value
    want = beit_bias(table, g)[0].long()
    for block in model.blocks:
        assert torch.equal(block.attn.rel_pos_bias.relative_position_index, want)


def test_eval_forward_of_mdt_ignores_the_mask_token_and_side_block():
    model = build("MDTv2", seed=5)
    x, t, y = inputs(model)
    with torch.no_grad():
        before = model(x, t, y)
        model.mask_token.add_(1.0)
        for p in model.sideblocks.parameters():
            p.add_(1.0)
        assert torch.equal(model(x, t, y), before)


@pytest.mark.parametrize("family", ["MDT", "MDTv2"])
def test_masked_training_forward_runs_and_depends_on_the_mask(family):
    model = build(family, seed=6, mask_ratio=0.3)
    x, t, y = inputs(model)
    with torch.no_grad():
        torch.manual_seed(0)
        a = model(x, t, y, enable_mask=True)
        torch.manual_seed(0)
        b = model(x, t, y, enable_mask=True)
        torch.manual_seed(1)
        c = model(x, t, y, enable_mask=True)
        plain = model(x, t, y)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c) and not torch.allclose(a, plain)


# ----------------------------------------------------------------------------- guidance


def guided_by_hand(out, n, scale):
    eps, rest = out[:, :n], out[:, n:]
    cond, uncond = eps.chunk(2, dim=0)
    scale = torch.as_tensor(scale, dtype=out.dtype).reshape(-1, 1, 1, 1)
    half = uncond + scale * (cond - uncond)
    return torch.cat([torch.cat([half, half]), rest], dim=1)


@pytest.mark.parametrize("in_channels,guided", [(4, 3), (1, 1), (3, 3)])
def test_dit_cfg_is_the_guidance_formula(in_channels, guided):
    assert guided_channels(in_channels) == guided
    model = build("DiT", in_channels=in_channels, seed=7)
    x, t, _ = inputs(model)
    t = torch.cat([t[:2], t[:2]])
    y = torch.tensor([1, 2, 10, 10])
    with torch.no_grad():
        got = model.forward_with_cfg(x, t, y, 4.0)
        half = x[:2]
        out = model(torch.cat([half, half]), t, y)
    want = guided_by_hand(out, guided, 4.0)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert not torch.allclose(got, out)  # guidance did something
    assert torch.equal(got[:2, :guided], got[2:, :guided])


def test_mdt_power_cosine_ramp_by_hand():
    t = torch.tensor([0, 250, 500, 999])
    for cfg, power in ((3.8, 4.0), (2.0, 1.0)):
        got = power_cosine_cfg_scale(cfg, t, 1000, power)
        for ti, gi in zip(t.tolist(), got.tolist()):
            want = (cfg - 1) * (1 - math.cos(((1 - ti / 1000) ** power) * math.pi)) / 2 + 1
            assert gi == pytest.approx(want, rel=1e-6)
    assert power_cosine_cfg_scale(3.8, torch.tensor([0]))[0].item() == pytest.approx(3.8)
    assert power_cosine_cfg_scale(2.0, torch.tensor([500]), 1000, 1.0)[0].item() == pytest.approx(1.5)
    assert power_cosine_cfg_scale(3.8, torch.tensor([999]))[0].item() == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("family", ["MDT", "MDTv2"])
@pytest.mark.parametrize("in_channels", [4, 1])
def test_mdt_cfg_is_the_ramped_guidance_formula(family, in_channels):
    model = build(family, in_channels=in_channels, seed=8)
    x, t, _ = inputs(model)
    t = torch.tensor([100, 700, 100, 700])
    y = torch.tensor([3, 4, 10, 10])
    with torch.no_grad():
        got = model.forward_with_cfg(x, t, y, 3.8, diffusion_steps=1000, scale_pow=4.0)
        half = x[:2]
        out = model(torch.cat([half, half]), t, y)
        assert torch.equal(model.forward_with_cfg(x, t, y, None), model(x, t, y))
    scale = [(3.8 - 1) * (1 - math.cos(((1 - ti / 1000) ** 4.0) * math.pi)) / 2 + 1 for ti in (100, 700)]
    want = guided_by_hand(out, 3 if in_channels == 4 else in_channels, scale)
    # the ramp itself is float32 (t / T on the integer timesteps), as in the official code
    assert rel_err(got, want) < 1e-6
    assert not torch.allclose(got, out)


# ----------------------------------------------------------------------------- attention options


def attention(window=None, dim=32, heads=4, seed=0):
    torch.manual_seed(seed)
    attn = Attention(dim, heads, qkv_bias=True, rel_pos_window=window).double()
    return randomise(attn, seed, std=0.3)


@pytest.mark.parametrize("window", [None, 4])
def test_query_index_rows_equal_the_full_attention(window):
    attn = attention(window)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 16, 32, generator=g, dtype=torch.float64)
    index = torch.stack([torch.randperm(16, generator=g)[:5] for _ in range(3)])
    with torch.no_grad():
        full = attn(x)
        part = attn(x, query_index=index)
        full_p, probs = attn(x, return_attention=True)
        part_p, part_probs = attn(x, query_index=index, return_attention=True)
    rows = torch.gather(full, 1, index[..., None].expand(-1, -1, 32))
    assert part.shape == (3, 5, 32)
    assert torch.allclose(part, rows, rtol=0, atol=1e-12)
    assert torch.allclose(part_p, rows, rtol=0, atol=1e-12)
    assert torch.allclose(part_probs, torch.gather(probs, 2, index[:, None, :, None].expand(-1, 4, -1, 16)),
                          rtol=0, atol=1e-14)


def test_query_index_with_token_ids_matches_the_subset_attention():
    """MDT's masked path: x holds tokens ``ids`` of the grid; the bias follows their positions."""
    attn = attention(window=4, seed=2)
    g = torch.Generator().manual_seed(2)
    ids = torch.stack([torch.randperm(16, generator=g)[:10] for _ in range(2)])
    x = torch.randn(2, 10, 32, generator=g, dtype=torch.float64)
    q = torch.stack([torch.randperm(10, generator=g)[:4] for _ in range(2)])
    with torch.no_grad():
        full = attn(x, token_ids=ids)
        part = attn(x, query_index=q, token_ids=ids)
        # by hand: the subset's bias is the full bias at rows/columns ids
        bias = beit_bias(attn.rel_pos_bias.relative_position_bias_table, 4)
        sub_bias = torch.stack([bias[:, i][:, :, i] for i in ids])
    rows = torch.gather(full, 1, q[..., None].expand(-1, -1, 32))
    assert torch.allclose(part, rows, rtol=0, atol=1e-12)
    sd = {f"a.{k}": v for k, v in attn.state_dict().items()}
    want = torch.cat([ref_attention(sd, "a", x[b:b + 1], 4, sub_bias[b:b + 1]) for b in range(2)])
    assert torch.allclose(full, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("window", [None, 4])
def test_returned_probabilities_sum_to_one_and_reproduce_the_output(window):
    attn = attention(window, seed=3)
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        out, probs = attn(x, return_attention=True)
        fused = attn(x)
        v = (x @ attn.qkv.weight[64:].T + attn.qkv.bias[64:]).reshape(2, 16, 4, 8).transpose(1, 2)
        again = attn.proj((probs @ v).transpose(1, 2).reshape(2, 16, 32))
    assert probs.shape == (2, 4, 16, 16)
    assert (probs >= 0).all()
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 16, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(again, out, rtol=0, atol=1e-12)
    assert torch.allclose(fused, out, rtol=0, atol=1e-12)  # fused and explicit paths agree
    sd = {f"a.{k}": v for k, v in attn.state_dict().items()}
    bias = None if window is None else beit_bias(attn.rel_pos_bias.relative_position_bias_table, 4)
    assert torch.allclose(out, ref_attention(sd, "a", x, 4, bias), rtol=0, atol=1e-12)


def test_fused_and_explicit_paths_agree_in_float32():
    attn = attention(4, seed=5).float()
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out, _ = attn(x, return_attention=True)
        assert torch.allclose(attn(x), out, rtol=1e-5, atol=1e-5)


def test_cpu_gelu_is_the_tanh_gelu_with_and_without_gradients():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(3)) * 4
    x64 = x.double().requires_grad_()
    ref = 0.5 * x64 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64**3)))  # the formula
    ref.sum().backward()
    act = TanhGELU()
    with torch.no_grad():
        fast = act(x)  # the in-place path
    xg = x.clone().requires_grad_()
    fast_grad = act(xg)
    fast_grad.sum().backward()
    torch.testing.assert_close(fast.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast_grad.detach(), fast, rtol=0, atol=1e-6)
    torch.testing.assert_close(xg.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, torch.nn.functional.gelu(x, approximate="tanh"), rtol=1e-6, atol=1e-6)
    assert torch.equal(act(x.double()), act(x.double()))  # float64 takes the same path, deterministically


# ----------------------------------------------------------------------------- cache context hooks


class Recorder:
    """A pass-through cache context that records what the model asks of it."""

    def __init__(self):
        self.calls = []

    def block(self, index, fn, x):
        self.calls.append(("block", index))
        return fn(x)

    def branch(self, block, name, fn, x):
        self.calls.append((name, block))
        return fn(x)


class PermutedSubset(Recorder):
    """Recomputes every branch through the token-subset path, all tokens in a shuffled order."""

    def __init__(self, seed=0):
        super().__init__()
        self.g = torch.Generator().manual_seed(seed)

    def branch(self, block, name, fn, x):
        self.calls.append((name, block))
        B, N, D = x.shape
        tokens = torch.stack([torch.randperm(N, generator=self.g) for _ in range(B)])
        part = fn(x, tokens)
        assert part.shape == (B, N, D)
        return torch.empty_like(part).scatter_(1, tokens[..., None].expand(-1, -1, D), part)


@pytest.mark.parametrize("family", ["DiT", "MDT", "MDTv2"])
def test_pass_through_context_is_bit_identical_and_sees_every_branch_once(family):
    model = build(family, dtype=torch.float32, seed=9)
    x, t, y = inputs(model)
    with torch.no_grad():
        plain = model(x, t, y)
        ctx = Recorder()
        model.cache_context = ctx
        try:
            hooked = model(x, t, y)
        finally:
            model.cache_context = None
    assert torch.equal(hooked, plain)
    n = model.block_count
    assert n == {"DiT": 4, "MDT": 4, "MDTv2": 6}[family]
    want = []
    for i in range(n):
        want += [("block", i), ("attn", i), ("mlp", i)]
    assert ctx.calls == want


@pytest.mark.parametrize("family", ["DiT", "MDT", "MDTv2"])
def test_subset_path_over_all_tokens_in_any_order_is_exact(family):
    model = build(family, seed=10)
    x, t, y = inputs(model)
    with torch.no_grad():
        plain = model(x, t, y)
        ctx = PermutedSubset(seed=1)
        model.cache_context = ctx
        try:
            hooked = model(x, t, y)
        finally:
            model.cache_context = None
    assert len(ctx.calls) == 3 * model.block_count
    assert rel_err(hooked, plain) < 1e-12


def test_branch_outputs_are_pre_gate():
    """What a context receives is the branch before the adaLN gate: zeroing the gates leaves
    the branch outputs unchanged but removes their effect on the block."""
    model = build("DiT", seed=11)
    x, t, y = inputs(model)
    seen = {}

    class Keep(Recorder):
        def branch(self, block, name, fn, x):
            seen[(block, name)] = out = fn(x)
            return out

    with torch.no_grad():
        model.cache_context = Keep()
        model(x, t, y)
        before = dict(seen)
        block0 = model.blocks[0]
        D = SMALL["hidden_size"]
        h = model.x_embedder(x) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y, False)
        mod = block0.adaLN_modulation(c)
        gate_msa = mod[:, 2 * D:3 * D]
        full = block0(h, c)
        model.cache_context = None
    # block 0's output = h + gate_msa·attn + gate_mlp·mlp with the recorded pre-gate outputs
    gate_mlp = mod[:, 5 * D:6 * D]
    want = h + gate_msa[:, None] * before[(0, "attn")]
    want = want + gate_mlp[:, None] * before[(0, "mlp")]
    assert torch.allclose(full, want, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- position embedding


@pytest.mark.parametrize("dim,grid", [(16, 4), (32, 3), (64, 8)])
def test_sincos_pos_embed_matches_the_mae_formula(dim, grid):
    got = sincos_pos_embed_2d(dim, grid)
    quarter = dim // 4
    want = np.zeros((grid * grid, dim))
    for n in range(grid * grid):
        row, col = n // grid, n % grid
        for i in range(quarter):
            omega = 1.0 / 10000 ** (i / quarter)
            # first half encodes the column (MAE's "w goes first"), second half the row
            want[n, i] = math.sin(col * omega)
            want[n, quarter + i] = math.cos(col * omega)
            want[n, 2 * quarter + i] = math.sin(row * omega)
            want[n, 3 * quarter + i] = math.cos(row * omega)
    assert got.shape == (grid * grid, dim)
    assert np.abs(got - want).max() < 1e-12


def test_models_initialise_pos_embeddings_with_the_sincos_table():
    torch.manual_seed(0)
    dit = DiT(**SMALL, in_channels=4)
    mdt = MDT(**SMALL, in_channels=4, decode_layer=2)
    table = torch.from_numpy(sincos_pos_embed_2d(32, 4)).float()[None]
    assert torch.equal(dit.pos_embed, table) and not dit.pos_embed.requires_grad
    assert torch.equal(mdt.pos_embed, table) and torch.equal(mdt.decoder_pos_embed, table)
    assert mdt.pos_embed.requires_grad
    # official init: adaLN and output layers start at zero, so a fresh model outputs zeros
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(dit(x, torch.tensor([1, 2]), torch.tensor([0, 1])), torch.zeros(2, 8, 8, 8))
