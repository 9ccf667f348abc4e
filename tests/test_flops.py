"""MACs: fvcore = analytic formula, published figures, and per-image costs of cached runs by hand."""
from dataclasses import dataclass

import pytest
import torch

from conftest import TINY, randomize
from tokencache.cache import CacheMethod, Compute, Subset, attach
from tokencache.metrics import flops
from tokencache.metrics.flops import (
    analytic_forward_macs,
    attention_branch_macs,
    build_for_counting,
    forward_cost,
    forward_macs,
    forward_macs_report,
    mlp_branch_macs,
    model_shape,
    run_macs,
    sampling_macs,
)
from tokencache.models import create_model
from tokencache.models.layers import unpatchify
from tokencache.sampling import draw_labels, generate, sample_generators

# TINY: 8×8 input, patch 2 → N = 16 tokens, D = 32, 2 heads, MLP hidden 128, 1 → 2 channels, 4 blocks.
N, D, M, L, F = 16, 32, 128, 4, 256



def sample(model, method, sampler, batch=2, cfg_scale=1.5, **params):
    """Engine summary (with counts) of one generation of ``batch`` images."""
    with attach(model, method, sampler, **params) as engine:
        gens = sample_generators(0, range(batch))
        generate(model, engine.sampler, draw_labels(gens, 10), gens, cfg_scale=cfg_scale,
                 step_listener=engine.step_listener)
    return engine.summary(counts=True)


# ---------------------------------------------------------------------- one forward


VARIANTS = [
    ("DiT", {}),
    ("DiT", dict(patch_size=1, num_heads=4, mlp_ratio=2.0, learn_sigma=False)),
    ("MDT", dict(decode_layer=2)),
    ("MDTv2", dict(decode_layer=2)),
    ("MDTv2", dict(depth=6, decode_layer=2, input_size=12, patch_size=3, mlp_ratio=3.0)),
]


@pytest.mark.parametrize("family,extra", VARIANTS)
@pytest.mark.parametrize("batch", [1, 3])
def test_fvcore_equals_analytic(family, extra, batch):
    model = create_model(family, **{**TINY, **extra}).eval()
    report = forward_macs_report(model, batch)
    assert report["macs"] == analytic_forward_macs(model, batch)
    s = model_shape(model)
    # fvcore would add 0 for the fused attention: our handle must have counted Q·Kᵀ and P·V.
    assert report["by_operator"]["scaled_dot_product_attention"] == batch * s.depth * 2 * s.tokens**2 * s.hidden
    assert "aten::scaled_dot_product_attention" not in report["unsupported_ops"]
    # the MLP activation (on the CPU: TanhGELU's x·σ(2u), one σ per block) is listed, priced 0 (fvcore's convention)
    assert report["unsupported_ops"]["aten::sigmoid_"] == s.depth


def test_tiny_dit_forward_by_hand():
    model = create_model("DiT", **TINY)
    block = 6 * D * D + 2 * 4 * N * D + 3 * N * D * D + 2 * N * N * D + N * D * D + 2 * N * D * M
    outside = N * D * 1 * 4 + (F * D + D * D) + 2 * D * D + 4 * N * D + N * D * 4 * 2
    assert forward_macs(model) == L * block + outside == 912_384


def test_mdtv2_skip_linear_by_hand():
    dit = create_model("DiT", **TINY)
    v2 = create_model("MDTv2", **TINY, decode_layer=2)  # 1 in-block, 1 out-block, 2 decoder blocks: 3 skips
    assert forward_macs(v2) - forward_macs(dit) == 3 * 2 * N * D * D


@pytest.mark.parametrize("explicit", [False, True])
def test_subset_attention_and_mlp_formulas_against_fvcore(explicit):
    """The partial-branch formulas, checked on the real modules with fvcore (k of N query tokens)."""
    block = create_model("DiT", **TINY).blocks[0]
    s = model_shape(create_model("DiT", **TINY))
    k = 5
    x = torch.randn(2, N, D)
    tokens = torch.arange(k).repeat(2, 1)

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = block.attn

        def forward(self, h, idx):
            out = self.attn(h, query_index=idx, return_attention=explicit)
            return out[0] if explicit else out

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = block.mlp

        def forward(self, h):
            return self.mlp(h[:, :k])

    count = flops.count_macs

    layer_norm = 4 * N * D  # in the branch formula, not inside the attention module
    assert count(Attn(), x, tokens) == 2 * (attention_branch_macs(s, k) - layer_norm)
    assert count(MLP(), x) == 2 * (mlp_branch_macs(s, k) - 4 * k * D)
    assert attention_branch_macs(s, N) + mlp_branch_macs(s, N) + 6 * D * D == \
        (analytic_forward_macs(s) - flops.step_fixed_macs(s)) // L


def test_forward_macs_refuses_an_attached_model(tiny_dit):
    with attach(tiny_dit, "fora", "ddim6"):
        with pytest.raises(RuntimeError, match="cache context attached"):
            forward_macs(tiny_dit)
    assert forward_macs(tiny_dit) == 912_384


def test_unpatchify_is_the_official_einsum_and_traceable():
    x = torch.randn(3, 16, 2 * 2 * 5)
    official = torch.einsum("nhwpqc->nchpwq", x.reshape(3, 4, 4, 2, 2, 5)).reshape(3, 5, 8, 8)
    assert torch.equal(unpatchify(x, 2, 5), official)
    traced = torch.jit.trace(lambda t: unpatchify(t, 2, 5), (x,), check_trace=False)
    assert torch.equal(traced(x), official)


def test_build_for_counting_counts_like_the_real_model():
    real = create_model("MDT", **TINY, decode_layer=2)
    empty = build_for_counting("MDT", **TINY, decode_layer=2)
    assert all(float(p.abs().sum()) == 0 for p in empty.parameters())
    assert forward_macs(empty) == forward_macs(real)


XL = [("DiT-XL/2", {}, 118_688_661_504, 118.6e9), ("DiT-XL/2", dict(input_size=64), 524_807_258_112, 524.6e9),
      ("MDTv2-XL/2", {}, 129_560_297_472, 129.56e9)]


@pytest.mark.parametrize("name,over,exact,published", XL)
def test_analytic_xl_matches_published_figures(name, over, exact, published):
    model = build_for_counting(name, device="meta", **over)
    macs = analytic_forward_macs(model)
    assert macs == exact
    assert abs(macs / published - 1) < 0.005


@pytest.mark.slow
@pytest.mark.parametrize("name,over,exact,published", XL)
def test_fvcore_xl_equals_analytic(name, over, exact, published):
    assert forward_macs(build_for_counting(name, **over)) == exact


# ---------------------------------------------------------------------- sampling runs


def test_full_run_is_steps_times_two_forwards(tiny_dit):
    summary = sample(tiny_dit, "full", "ddim6")
    out = sampling_macs(tiny_dit, summary, cfg=True)
    assert out["macs_per_image"] == 6 * forward_macs(tiny_dit) * 2 == out["macs_per_image_full"]
    assert out["macs_speedup"] == 1.0 and out["overhead_macs_per_image"] == 0 and out["cfg_included"]
    assert sampling_macs(tiny_dit, summary, cfg=False)["macs_per_image"] == 6 * forward_macs(tiny_dit)


def test_cfg_rows_rule_matches_what_the_model_sees(tiny_dit, tiny_mdt):
    for model, scale in [(tiny_dit, 1.5), (tiny_dit, 1.0), (tiny_mdt, 1.0)]:
        rows = sample(model, "fora", "ddim3", batch=3, cfg_scale=scale)["rows"]
        assert rows == 3 * flops.cfg_rows_per_image(model.config["family"], scale)
    assert flops.cfg_rows_per_image("DiT", 1.0) == 1


def test_fora_ddim50_by_hand(tiny_dit):
    summary = sample(tiny_dit, "fora", "ddim50", batch=1, interval=3)
    full_step = forward_macs(tiny_dit)
    # a reuse step still embeds, modulates every block (adaLN) and runs the final layer
    reuse_step = (N * D * 4) + (F * D + D * D) + (2 * D * D + 4 * N * D + N * D * 8) + L * 6 * D * D
    out = sampling_macs(tiny_dit, summary, cfg=True)
    # full where the down-counting index i is 49 or divisible by 3: 18 full steps, 32 reuse steps
    assert out["macs_per_image"] == 2 * (18 * full_step + 32 * reuse_step)
    assert out["macs_per_image_full"] == 2 * 50 * full_step
    assert out["macs_speedup"] == pytest.approx(50 * full_step / (18 * full_step + 32 * reuse_step), rel=1e-12)


@dataclass
class FixedSubset(CacheMethod):
    """Step 0 computes; later steps recompute the first 5 attention / 11 MLP tokens of every block."""

    name = "fixed-subset"
    ROWS = 4  # 2 images × 2 CFG rows

    def branch_action(self, step, block, branch):
        if step == 0:
            return Compute()
        k = {"attn": 5, "mlp": 11}[branch]
        return Subset(torch.arange(k).repeat(self.ROWS, 1))


def test_subset_steps_by_hand(tiny_dit):
    summary = sample(tiny_dit, FixedSubset(), "ddim4", batch=2)
    assert summary["counts"][1][0] == [5, 11]
    ka, km = 5, 11
    attn = 4 * N * D + ka * D * D + 2 * N * D * D + 2 * ka * N * D + ka * D * D
    mlp = 4 * km * D + 2 * km * D * M
    fixed = (N * D * 4) + (F * D + D * D) + (2 * D * D + 4 * N * D + N * D * 8)
    subset_step = fixed + L * (6 * D * D + attn + mlp)
    out = sampling_macs(tiny_dit, summary)
    assert out["macs_per_image"] == 2 * (forward_macs(tiny_dit) + 3 * subset_step)


def test_deepcache_skipped_blocks_cost_nothing(tiny_dit):
    summary = sample(tiny_dit, "deepcache", "ddim6", interval=2, shallow_blocks=1)
    assert summary["blocks_run"][1] == [1, 0, 0, 1] and summary["blocks_run"][0] == [1, 1, 1, 1]
    full_step = forward_macs(tiny_dit)
    block = (full_step - flops.step_fixed_macs(model_shape(tiny_dit))) // L
    reuse_step = flops.step_fixed_macs(model_shape(tiny_dit)) + 2 * block
    out = sampling_macs(tiny_dit, summary)
    assert out["macs_per_image"] == 2 * (3 * full_step + 3 * reuse_step)
    assert out["overhead_counts_per_image"]["span_residual_tokens"] == 2 * 6 * N  # stored 3×, re-added 3×
    assert out["overhead_macs"]["span_residual_tokens"] == 0


def test_mdtv2_deepcache_counts_skip_linear_only_where_blocks_ran():
    model = randomize(create_model("MDTv2", **{**TINY, "depth": 6}, decode_layer=2)).eval()
    # blocks: 0, 1 encoder-in; 2, 3 encoder-out (skip); 4, 5 decoder (skip). Span reused: 1…2.
    summary = sample(model, "deepcache", "ddim4", interval=2, shallow_blocks=1)
    assert summary["blocks_run"][1] == [1, 0, 0, 1, 1, 1]
    plain = 6 * D * D + 8 * N * D + 4 * N * D * D + 2 * N * N * D + 2 * N * D * M
    skip = plain + 2 * N * D * D
    fixed = flops.step_fixed_macs(model_shape(model))
    full_step, reuse_step = fixed + 2 * plain + 4 * skip, fixed + plain + 3 * skip
    assert full_step == forward_macs(model)
    assert sampling_macs(model, summary)["macs_per_image"] == 2 * (2 * full_step + 2 * reuse_step)


def test_steps_speedup_is_against_the_requested_sampler(tiny_dit):
    summary = sample(tiny_dit, "steps", "ddim50", batch=1, num_steps=25)
    out = sampling_macs(tiny_dit, summary)
    assert (out["sampler"], out["requested_sampler"], out["num_steps"]) == ("ddim25", "ddim50", 25)
    assert out["macs_per_image_full"] == 2 * 50 * forward_macs(tiny_dit)
    assert out["macs_speedup"] == 2.0


def test_toca_overhead_is_priced_apart(tiny_dit):
    summary = sample(tiny_dit, "toca", "ddim6", batch=1)
    out = sampling_macs(tiny_dit, summary)
    overhead = summary["overhead"]
    heads = 2
    expected = 2 * (overhead["attention_scores"]["total"] * (heads * N * N + N * N + N)
                    + overhead["token_scores"]["total"] * 2)
    assert overhead["attention_scores"]["total"] > 0 and overhead["token_scores"]["total"] > 0
    assert out["overhead_macs_per_image"] == expected
    assert out["overhead_counts_per_image"]["explicit_attention"] == 2 * overhead["explicit_attention"]["total"]
    assert out["overhead_macs"]["explicit_attention"] == 0
    assert out["macs_speedup_with_overhead"] < out["macs_speedup"]


def test_summary_of_another_model_is_refused(tiny_dit, tiny_mdt):
    summary = sample(tiny_dit, "fora", "ddim3", batch=1)
    with pytest.raises(ValueError, match="another model"):
        sampling_macs(create_model("DiT", **{**TINY, "depth": 3}), summary)
    with pytest.raises(ValueError, match="no token counts"):
        sampling_macs(tiny_dit, {k: v for k, v in summary.items() if k != "counts"})


def test_run_macs_of_a_real_run_json(tmp_path):
    from tokencache.run import SampleRequest, run_sampling
    from tokencache.train import TrainConfig, train_backbone

    ckpt = str(tmp_path / "tiny.pt")
    train_backbone(TrainConfig(model="DiT", overrides=TINY, steps=2, batch_size=4), ckpt, progress=False)
    out = str(tmp_path / "s.npz")
    run_sampling(SampleRequest(checkpoint=ckpt, out=out, sampler="ddim6", num_samples=3, batch_size=2,
                               method="fora", method_params={"interval": 2}, device="cpu"), progress=False)
    result = run_macs(tmp_path / "s.json")
    full_step = analytic_forward_macs(create_model("DiT", **TINY))
    reuse_step = flops.step_fixed_macs(model_shape(create_model("DiT", **TINY))) + L * 6 * D * D
    assert result["macs_per_image"] == 2 * (4 * full_step + 2 * reuse_step)  # full at i = 5, 4, 2, 0
    assert result["macs_per_image_full"] == 2 * 6 * full_step and result["cfg_included"]


def test_forward_cost_for_the_cli():
    counted = forward_cost("DiT", batch_size=2, **TINY)
    assert counted["match"] is True and counted["analytic_macs"] == counted["fvcore"]["macs"] == 2 * 912_384
    assert sum(counted["analytic_breakdown"].values()) == counted["analytic_macs"]
    shapes_only = forward_cost("DiT-XL/2", count_with_fvcore=False)
    assert shapes_only["fvcore"] is None and shapes_only["analytic_macs"] == 118_688_661_504
