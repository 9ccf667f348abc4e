"""MagCache, Δ-DiT, DuCa's kv-norm score and TokenCache v2's last blocks, against independent rules.

MagCache: the engine's schedule against ``magcache_decisions`` (official_rules.py, transcribed
from MagCache4FLUX, MagCache4Wan2.1 and diffusers' hook) for each rule; the images against the
official forward (input + the stored stack residual on skipped steps), written here without the
engine; the calibrated curve against ``magcache_fit`` on the residuals of the same full run.
Δ-DiT (no official code): the blocks run per step against ``delta_dit_plan``, and the images
against a direct Δ-Cache forward. DuCa kv-norm: every MLP subset against the transcription's
choice from the value heads the engine saw.
"""
import sys

import numpy as np
import pytest
import torch

from conftest import TINY, calibration_file, randomize
from official_rules import delta_dit_plan, duca_official, magcache_decisions, magcache_fit
from tokencache.cache import Subset, attach, calibrate, get_method, load_calibration
from tokencache.cache.calibration import CalibrationError, SamplingSettings
from tokencache.models import create_model
from tokencache.models.layers import unpatchify
from tokencache.sampling import draw_labels, generate, sample_generators

SAMPLER = "ddim20"
CFG = 2.0


def run(model, method, indices=range(3), sampler=SAMPLER, seed=3, forward=None):
    gens = sample_generators(seed, list(indices))
    if method is None:
        if forward is not None:
            model.forward = forward
        try:
            return generate(model, sampler, draw_labels(gens, 10), gens, cfg_scale=CFG, clip_denoised=True), None
        finally:
            if forward is not None:
                del model.forward
    with attach(model, method, sampler) as engine:
        images = generate(model, engine.sampler, draw_labels(gens, 10), gens, cfg_scale=CFG, clip_denoised=True,
                          step_listener=engine.step_listener)
    return images, engine


def module(name):
    return sys.modules[type(get_method(name)).__module__]


@pytest.fixture(scope="module")
def dit():
    return randomize(create_model("DiT", **TINY)).eval()


@pytest.fixture(scope="module")
def mdt():
    return randomize(create_model("MDTv2", **dict(TINY, depth=6), decode_layer=2)).eval()


def stack_forward(model, per_step):
    """DiT's forward with the block stack replaced by ``per_step(k, x, c, run_blocks)`` (k counted per call)."""
    state = {"k": 0}

    def run_blocks(x, c, start=0, end=None):
        for block in model.blocks[start:(len(model.blocks) if end is None else end + 1)]:
            x = block(x, c)
        return x

    def forward(x, t, y):
        x = model.x_embedder(x) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y, False)
        x = per_step(state["k"], x, c, run_blocks)
        state["k"] += 1
        return unpatchify(model.final_layer(x, c), model.patch_size, model.out_channels)

    return forward


# --------------------------------------------------------------------------------------------- MagCache

CURVE = [1.0, 1.02, 0.99, 1.01, 1.0, 0.97, 1.03, 1.0, 1.01, 0.98, 1.0, 1.05, 0.96, 1.0, 1.0, 1.02, 0.9, 1.1,
         1.0, 0.95]


def magcache_file(tmp_path, model, curve=CURVE):
    return calibration_file(tmp_path / "mag.pt", "magcache", model, SAMPLER,
                            mag_ratios=torch.tensor(curve, dtype=torch.float64))


@pytest.mark.parametrize("rule, threshold, retention, skips", [
    (rule, *case) for rule in ("official", "diffusers", "wan") for case in ((0.06, 0.2, 3), (0.2, 0.1, 5))
] + [("official", 0.035, 0.0, 2), ("diffusers", 0.035, 0.0, 2)])  # (0.03: a float32 tie)
def test_magcache_schedule_is_the_official_rule(rule, threshold, retention, skips, dit, tmp_path):
    flavor = rule
    path = magcache_file(tmp_path, dit)
    method = get_method("magcache", mag_ratios=path, threshold=threshold, retention_ratio=retention,
                        max_skip_steps=skips, rule=rule)
    _, engine = run(dit, method, [0])
    if retention == 0.0 and flavor == "official":  # the FLUX code has no residual at step 0: diffusers' guard
        flavor = "diffusers"
    compute, _ = magcache_decisions(CURVE, 20, threshold, retention, skips, flavor=flavor)
    ran = [bool(engine.blocks_run[k].all()) for k in range(20)]
    assert ran == compute and not all(compute)
    assert all(engine.blocks_run[k].sum() == 0 for k in range(20) if not compute[k])


def test_magcache_images_are_the_official_forward(dit, tmp_path):
    """A skipped step returns the stack's input + the residual of the last computed step (magcache_flux.py:340)."""
    path = magcache_file(tmp_path, dit)
    images, engine = run(dit, get_method("magcache", mag_ratios=path, threshold=0.1, max_skip_steps=4))
    compute, _ = magcache_decisions(CURVE, 20, 0.1, 0.2, 4)
    stored = {}

    def per_step(k, x, c, run_blocks):
        if compute[k]:
            out = run_blocks(x, c)
            stored["residual"] = out - x
            return out
        return x + stored["residual"]

    want, _ = run(dit, None, forward=stack_forward(dit, per_step))
    assert torch.equal(images, want)
    assert engine.summary()["host_syncs"] == 0  # a fixed schedule: nothing is read back from the device


def test_magcache_calibration_is_the_official_curve(dit, tmp_path):
    """Our curve over M samples = the official script's on a batch of those M samples (mean over rows and tokens)."""
    settings = module("magcache").MagCacheRatios(num_samples=3, batch_size=3, seed=4)
    out = tmp_path / "curve.pt"
    summary = calibrate(get_method("magcache"), dit, SAMPLER, settings, SamplingSettings(cfg_scale=CFG,
                                                                                        clip_denoised=True), out=out)
    residuals = []

    def per_step(k, x, c, run_blocks):
        out = run_blocks(x, c)
        residuals.append(out - x)
        return out

    run(dit, None, indices=range(3), seed=4, forward=stack_forward(dit, per_step))
    official = magcache_fit(residuals)
    tensors = load_calibration(get_method("magcache"), out, dit, SAMPLER)
    assert len(official) == 20 and tensors["mag_ratios"].tolist() == pytest.approx(official, abs=1.01e-5)
    assert summary["mag_ratios"][0] == 1.0 and summary["rounding"] == 5
    with pytest.raises(CalibrationError, match="sampler"):
        load_calibration(get_method("magcache"), out, dit, "ddim10")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    assert settings.figure(tensors, ax, "curve")
    plt.close(fig)


def test_magcache_schedule_is_the_same_for_every_sample_and_batch(dit, mdt, tmp_path):
    for model in (dit, mdt):
        path = magcache_file(tmp_path, model)
        method = get_method("magcache", mag_ratios=path, threshold=0.1)
        together, _ = run(model, method, range(4))
        for i in (0, 3):
            alone, _ = run(model, get_method("magcache", mag_ratios=path, threshold=0.1), [i])
            assert torch.equal(alone[0], together[i])


def test_magcache_noop_is_the_full_model(dit, tmp_path):
    path = magcache_file(tmp_path, dit, [1.0] * 20)
    images, engine = run(dit, get_method("magcache", mag_ratios=path, max_skip_steps=0))
    assert engine.blocks_run.all()
    assert torch.equal(images, run(dit, None)[0])
    skip, _ = module("magcache").magcache_schedule([1.0] * 20, 20, 0.0, 0.2, 3)
    assert sum(skip) == 12  # a curve of exact ones never adds error: K skips, then a computed step


# ------------------------------------------------------------------------------------------------ Δ-DiT


@pytest.mark.parametrize("interval, boundary", [(2, 0.5), (3, 0.5), (2, 0.25), (4, 0.7)])
def test_delta_dit_runs_the_plan(interval, boundary, dit):
    L, T = TINY["depth"], 20
    _, engine = run(dit, get_method("delta-dit", interval=interval, boundary=boundary, front_blocks=3,
                                    rear_blocks=2), [0])
    plan = delta_dit_plan(T, L, int(boundary * T + 0.5), front_blocks=3, rear_blocks=2, interval=interval)
    for k in range(T):
        ran = engine.blocks_run[k] > 0
        skipped = set() if plan[k] is None else set(range(plan[k][0], plan[k][1] + 1))
        assert [not r for r in ran.tolist()] == [b in skipped for b in range(L)], k
    assert any(p == (0, 2) for p in plan) and any(p == (2, 3) for p in plan)


def test_delta_dit_images_are_the_delta_cache(dit):
    """A cached span returns its current input + Δ (span output − span input at its full step)."""
    images, _ = run(dit, get_method("delta-dit", front_blocks=3, rear_blocks=2))
    plan = delta_dit_plan(20, TINY["depth"], 10, front_blocks=3, rear_blocks=2, interval=2)
    delta = {}

    def per_step(k, x, c, run_blocks):
        L = TINY["depth"]
        if plan[k] is None:
            nxt = plan[k + 1] if k + 1 < len(plan) else None
            for b in range(L):
                before = x
                x = run_blocks(x, c, b, b)
                if nxt is not None and b == nxt[0]:
                    span_input = before
                if nxt is not None and b == nxt[1]:
                    delta[nxt] = x - span_input
            return x
        start, end = plan[k]
        x = run_blocks(x, c, 0, start - 1) if start > 0 else x
        x = x + delta[plan[k]]
        return run_blocks(x, c, end + 1) if end + 1 < L else x

    want, _ = run(dit, None, forward=stack_forward(dit, per_step))
    assert torch.equal(images, want)


def test_delta_dit_defaults_and_long_skips(dit, mdt):
    spans = module("delta-dit").delta_dit_spans
    assert spans(28, 21, 21, {}) == ((0, 20), (7, 27))  # DiT-XL/2 at the default share 0.75
    method = get_method("delta-dit")
    _, engine = run(dit, method, [0])
    assert engine.summary()["resolved"]["front_span"] == [0, 2]  # round(0.75 · 4) = 3 blocks
    # MDTv2 (6 blocks: 2 in, 2 out, 2 decoder; skips 0→3, 1→2): a front span of 2 grows to block 3
    _, engine = run(mdt, get_method("delta-dit", front_blocks=2, rear_blocks=2), [0])
    resolved = engine.summary()["resolved"]
    assert resolved["front_span"] == [0, 3] and resolved["rear_span"] == [4, 5]
    with pytest.raises(ValueError, match="front_blocks"):
        spans(4, 4, 2, {})


# ----------------------------------------------------------------------------------------- DuCa kv-norm


def test_duca_kv_norm_chooses_the_official_tokens(dit):
    """Every MLP subset equals the official kv-norm score's choice on the value heads of the full blocks."""
    method = get_method("duca", fresh_ratio=0.2, cache_type="kv-norm")
    values, chosen = {}, {}
    observe, decide = method.observe, method.branch_action

    def spy_observe(step, block, branch, *, x, output, attention, rows, **extra):
        if "values" in extra:
            values[(step, block)] = extra["values"].clone()
        assert attention is None  # the fused path: no explicit map
        observe(step, block, branch, x=x, output=output, attention=attention, rows=rows, **extra)

    def spy_decide(step, block, branch):
        action = decide(step, block, branch)
        if branch == "mlp" and isinstance(action, Subset):
            chosen[(step, block)] = action.tokens.clone()
        return action

    method.observe, method.branch_action = spy_observe, spy_decide
    _, engine = run(dit, method, range(3), sampler="ddim50")
    _, _, official = duca_official(50, TINY["depth"], 16, 0.2, 3, value_vectors=lambda k, l: values[(k, l)])
    partial = {key: value for key, value in official.items() if 0 < value.shape[1] < 16}
    assert partial and set(partial) == set(chosen)
    for key, tokens in partial.items():
        assert torch.equal(chosen[key], tokens), key
    overhead = engine.record.overhead
    assert overhead["value_scores"].sum() > 0 and "attention_scores" not in overhead
    assert "explicit_attention" not in overhead


# --------------------------------------------------------------------------------- TokenCache v2 last K


def test_v2_last_blocks_take_their_tokens_from_the_same_budget():
    block_budget = module("tokencache").v2.block_budget
    mean_alpha = torch.tensor([[0.9, 0.8, 0.1, 0.2], [0.5, 0.4, 0.3, 0.05], [0.6, 0.7, 0.01, 0.02]])
    assert block_budget(mean_alpha, 0.5) == [2, 2, 2]
    assert block_budget(mean_alpha, 0.5, last_blocks=1) == [2, 0, 4]  # block 2 computes all; 2 left for 0–1
    assert block_budget(mean_alpha, 0.25, last_blocks=1) == [2, 3, 4]
    assert block_budget(mean_alpha, 0.9, last_blocks=1) == [0, 0, 4]  # more than the budget: the rest reuse all
    for ratio in np.linspace(0, 1, 11):
        assert sum(block_budget(mean_alpha, float(ratio), 1)) == max(4, round((1 - ratio) * 12))
    with pytest.raises(ValueError, match="version=2"):
        get_method("tokencache", last_blocks=2)
