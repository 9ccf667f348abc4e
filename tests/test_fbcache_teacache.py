"""First-Block Cache and TeaCache against independent transcriptions of their official code.

The transcriptions (``official_rules.py``) run as the official integrations do — diffusers' block
hooks, cache-dit's blocks forward, Latte's TeaCache forward — on a batch of one sample, where the
official batch-wide decision is that sample's decision. The engine runs the same samples in one
batch and decides per sample; every decision, the signal and the image must agree.

Tiny random models change a lot between steps (relative L1 changes of 0.5–4), so thresholds around
1 give both decisions.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from conftest import TINY, calibration_file, randomize
from official_rules import CacheDiTContext, DiffusersFirstBlockCache, TeaCacheLatte, cachedit_blocks_forward
from tokencache.cache import attach, calibrate, get_method, load_calibration, method_class
from tokencache.cache.calibration import CalibrationError, SamplingSettings
from tokencache.metrics.flops import execution_blocks
from tokencache.models import create_model
from tokencache.models.layers import unpatchify
from tokencache.sampling import draw_labels, generate, parse_sampler, sample_generators

SAMPLER = "ddim40"
SAMPLES = 4
#: a degree-4 polynomial (highest power first) positive on the tiny models' range of changes
POLY = [0.5, -1.0, 0.8, 0.6, 0.05]


@pytest.fixture(scope="module")
def models():
    return {"DiT": randomize(create_model("DiT", **TINY)).eval(),
            "MDTv2": randomize(create_model("MDTv2", **dict(TINY, depth=6), decode_layer=2)).eval()}


def generate_samples(model, indices, engine=None, sampler=SAMPLER, seed=7):
    gens = sample_generators(seed, indices)
    return generate(model, engine.sampler if engine else sampler, draw_labels(gens, 10), gens, cfg_scale=2.0,
                    clip_denoised=True, step_listener=engine.step_listener if engine else None)


def engine_run(model, method, indices=range(SAMPLES), sampler=SAMPLER, seed=7):
    """Images of ``indices`` in one batch and, per sample, [(signal or None, reuse)] per step."""
    with attach(model, method, sampler) as engine:
        images = generate_samples(model, list(indices), engine, sampler, seed)
    history = engine.method.state.history
    key = "diff" if "diff" in history[0] else "rel"
    per_sample = []
    for i in range(len(indices)):
        steps = []
        for entry in history:
            signal = entry[key]
            value = None if signal is None or torch.isnan(signal[i]) else float(signal[i])
            steps.append((value, bool(entry["reuse"][i])))
            if method.cfg == "together":  # both CFG rows of a sample decide together
                assert bool(entry["reuse"][i]) == bool(entry["reuse"][i + len(indices)])
        per_sample.append(steps)
    return images, per_sample, engine


def both_ways(decisions):
    flat = [reuse for sample in decisions for _, reuse in sample]
    return any(flat) and not all(flat)


# ------------------------------------------------------------------------------- official forwards


def run_stack(model, x, c, start=0):
    """The model's blocks from ``start`` on x (DiT: blocks; MDTv2: long skips, decoder embedding), as its forward."""
    if not hasattr(model, "en_inblocks"):
        for block in model.blocks[start:]:
            x = block(x, c)
        return x
    assert start == 0
    input_skip, skips = x, []
    for block in model.en_inblocks:
        x = block(x, c)
        skips.append(x)
    for block in model.en_outblocks:
        x = block(x, c, skip=skips.pop())
    for j, block in enumerate(model.de_blocks):
        x = block(x + model.decoder_pos_embed if j == 0 else x, c, skip=input_skip)
    return x


@contextmanager
def replaced_forward(model, forward):
    model.forward = forward
    try:
        yield
    finally:
        del model.forward


@contextmanager
def diffusers_hooks(model, fbc: DiffusersFirstBlockCache):
    """``apply_first_block_cache``: the head hook on the first block, the others pass through, the
    last stores the tail residual. DiT: on ``blocks`` (a name diffusers looks for); MDTv2: on each
    block's call, where the model adds the decoder embedding and the long skip."""
    if hasattr(model, "en_inblocks"):
        last = model.block_count - 1
        original = model._run

        def run(index, block, x, c, skip=None, add_pos=None, token_ids=None):
            unit = functools.partial(lambda h: original(index, block, h, c, skip=skip, add_pos=add_pos))
            if index == 0:
                return fbc.head(unit, x)
            return fbc.block(unit, x, is_tail=index == last)

        model._run = run
        try:
            yield
        finally:
            del model._run
        return
    blocks = model.blocks
    for i, block in enumerate(blocks):
        if i == 0:
            block.forward = functools.partial(fbc.head, block.forward)
        else:
            block.forward = functools.partial(fbc.block, block.forward, is_tail=i == len(blocks) - 1)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def official_fbcache(model, threshold, indices=range(SAMPLES)):
    images, logs = [], []
    for i in indices:
        fbc = DiffusersFirstBlockCache(threshold)
        with diffusers_hooks(model, fbc):
            images.append(generate_samples(model, [i]))
        logs.append([(diff, not compute) for diff, compute in fbc.log])
    return torch.cat(images), logs


def official_cachedit(model, Fn=1, Bn=0, indices=range(SAMPLES), **config):
    images, logs = [], []
    for i in indices:
        context = CacheDiTContext(**config)
        blocks = [lambda h, c, b=b: b(h, c) for b in model.blocks]

        def forward(x, t, y):
            x = model.x_embedder(x) + model.pos_embed
            c = model.t_embedder(t) + model.y_embedder(y, False)
            x = cachedit_blocks_forward(context, blocks, x, c, Fn=Fn, Bn=Bn)
            return unpatchify(model.final_layer(x, c), model.patch_size, model.out_channels)

        with replaced_forward(model, forward):
            images.append(generate_samples(model, [i]))
        logs.append([(diff, reuse) for diff, reuse in context.log])
    return torch.cat(images), logs


def official_teacache(model, threshold, coefficients, indices=range(SAMPLES), sampler=SAMPLER):
    timestep_map = parse_sampler(sampler).diffusion().timestep_map
    steps = parse_sampler(sampler).steps
    all_timesteps = [int(timestep_map[steps - 1 - k]) for k in range(steps)]
    block0 = execution_blocks(model)[0]
    images, logs = [], []
    for i in indices:
        tea = TeaCacheLatte(threshold, coefficients, all_timesteps)

        def forward(x, t, y):
            x = model.x_embedder(x) + model.pos_embed
            c = model.t_embedder(t) + model.y_embedder(y, False)
            shift_msa, scale_msa = block0.adaLN_modulation(c).chunk(6, dim=1)[:2]
            inp = x.clone()
            modulated_inp = block0.norm1(inp) * (1 + scale_msa.unsqueeze(1)) + shift_msa.unsqueeze(1)
            x = tea.forward(x, t, modulated_inp, lambda h: run_stack(model, h, c))
            return unpatchify(model.final_layer(x, c), model.patch_size, model.out_channels)

        with replaced_forward(model, forward):
            images.append(generate_samples(model, [i], sampler=sampler))
        logs.append([(rel, not calc) for rel, calc in tea.log])
    return torch.cat(images), logs


def assert_same_decisions(ours, official):
    assert len(ours) == len(official)
    for sample, (mine, theirs) in enumerate(zip(ours, official)):
        assert [r for _, r in mine] == [r for _, r in theirs], f"sample {sample}"
        for step, ((a, _), (b, _)) in enumerate(zip(mine, theirs)):
            assert (a is None) == (b is None), (sample, step)
            if a is not None:
                assert a == pytest.approx(b, rel=1e-6), (sample, step)


# ---------------------------------------------------------------------------------- First-Block Cache


@pytest.mark.parametrize("family", ["DiT", "MDTv2"])
def test_fbcache_is_diffusers_first_block_cache_per_sample(family, models):
    """diffusers' hooks on one sample at a time = the engine on the batch: decisions, d, images."""
    model = models[family]
    images, ours, engine = engine_run(model, get_method("fbcache", threshold=1.0))
    want, official = official_fbcache(model, 1.0)
    assert both_ways(official)
    assert_same_decisions(ours, official)
    assert torch.equal(images, want)
    # blocks 1…L−1 ran for the rows that computed, block 0 always
    record = engine.record
    for k in range(len(ours[0])):
        computed = 2 * sum(not sample[k][1] for sample in ours)
        assert record.block_sums[k, 0] == 2 * SAMPLES and (record.block_sums[k, 1:] == computed).all()


CACHEDIT = [
    dict(config=dict(residual_diff_threshold=0.99, max_warmup_steps=0), params=dict(threshold=0.99)),
    dict(config=dict(residual_diff_threshold=1.2, max_warmup_steps=5, warmup_interval=2),
         params=dict(threshold=1.2, max_warmup_steps=5, warmup_interval=2)),
    dict(config=dict(residual_diff_threshold=1.2, max_warmup_steps=0, max_cached_steps=4),
         params=dict(threshold=1.2, max_cached_steps=4)),
    dict(config=dict(residual_diff_threshold=1.2, max_warmup_steps=0, max_continuous_cached_steps=2),
         params=dict(threshold=1.2, max_continuous_cached_steps=2)),
    dict(config=dict(residual_diff_threshold=1.2, max_warmup_steps=0, max_accumulated_residual_diff_threshold=12.0),
         params=dict(threshold=1.2, max_accumulated_diff=12.0)),
    dict(config=dict(residual_diff_threshold=1.0, max_warmup_steps=3), params=dict(threshold=1.0, max_warmup_steps=3)),
    dict(Fn=2, Bn=1, config=dict(residual_diff_threshold=1.2, max_warmup_steps=0),
         params=dict(threshold=1.2, fn_compute_blocks=2, bn_compute_blocks=1)),
]


@pytest.mark.parametrize("case", CACHEDIT, ids=["rule", "warmup", "max_cached", "max_continuous", "max_accumulated",
                                                "threshold_1", "F2B1"])
def test_fbcache_options_are_cache_dit(case, models):
    """cache-dit's can_cache and DBCache forward on one sample = the engine with rule="cache-dit"."""
    model = models["DiT"]
    Fn, Bn = case.get("Fn", 1), case.get("Bn", 0)
    want, official = official_cachedit(model, Fn=Fn, Bn=Bn, **case["config"])
    images, ours, _ = engine_run(model, get_method("fbcache", rule="cache-dit", **case["params"]))
    assert both_ways(official)
    assert_same_decisions(ours, official)
    assert torch.equal(images, want)


def test_fbcache_rules_differ_only_at_the_threshold(models):
    """With τ set to a d the engine measured (below 1, where cache-dit always reuses), diffusers reuses
    (not d > τ) and cache-dit computes (not d < τ). Until that step both runs follow the first one."""
    model = models["DiT"]
    _, ours, _ = engine_run(model, get_method("fbcache", threshold=0.0), indices=[0])  # every step computes
    step, (d, _) = next((k, s) for k, s in enumerate(ours[0]) if s[0] is not None and s[0] < 1)  # all before: ≥ 1
    decide = {}
    for rule in ("diffusers", "cache-dit"):
        _, run, _ = engine_run(model, get_method("fbcache", threshold=d, rule=rule, max_cached_steps=1), indices=[0])
        decide[rule] = run[0][step]
    assert decide["diffusers"] == (d, True) and decide["cache-dit"] == (d, False)


def test_fbcache_run_length_counter(models):
    """The true run length never allows more than the limit of consecutive reused steps; cache-dit's may."""
    model = models["DiT"]
    for counter in ("cache-dit", "run-length"):
        _, ours, _ = engine_run(model, get_method("fbcache", threshold=3.0, max_continuous_cached_steps=2,
                                                  continuous_counter=counter))
        runs = []
        for sample in ours:
            length = 0
            for _, reuse in sample:
                length = length + 1 if reuse else 0
                runs.append(length)
        assert max(runs) >= 2
        if counter == "run-length":
            assert max(runs) == 2


def test_fbcache_refuses_a_span_that_cuts_a_long_skip(models):
    model = models["MDTv2"]  # blocks 0,1 push; 2,3 pop (3 ← 0, 2 ← 1); 4,5 decoder
    with attach(model, get_method("fbcache", bn_compute_blocks=3), SAMPLER):
        pass
    with pytest.raises(ValueError, match="long skip"):
        with attach(model, get_method("fbcache", bn_compute_blocks=4), SAMPLER):
            pass
    with pytest.raises(ValueError, match="no block to reuse"):
        with attach(models["DiT"], get_method("fbcache", fn_compute_blocks=3, bn_compute_blocks=1), SAMPLER):
            pass


# -------------------------------------------------------------------------------------------- TeaCache


@pytest.mark.parametrize("family", ["DiT", "MDTv2"])
def test_teacache_is_the_official_forward_per_sample(family, models, tmp_path):
    """Latte's TeaCache forward on one sample at a time = the engine on the batch: decisions, rel, images."""
    model = models[family]
    path = calibration_file(tmp_path / "c.pt", "teacache", model, SAMPLER,
                            coefficients=torch.tensor(POLY, dtype=torch.float64))
    images, ours, engine = engine_run(model, get_method("teacache", coefficients=path, threshold=1.2))
    want, official = official_teacache(model, 1.2, POLY)
    assert both_ways(official)
    assert_same_decisions(ours, official)
    assert torch.equal(images, want)
    assert not ours[0][0][1] and not ours[0][-1][1]  # first and last step compute
    summary = engine.summary()
    assert 0 < summary["blocks_run_fraction"] < 1 and summary["host_syncs"] == len(ours[0])


@pytest.mark.parametrize("name,params", [("fbcache", dict(threshold=1.0, cfg="together")),
                                         ("fbcache", dict(threshold=1.0, cfg="separate")),
                                         ("teacache", dict(threshold=1.2, cfg="together")),
                                         ("teacache", dict(threshold=1.2, cfg="separate"))])
@pytest.mark.parametrize("family", ["DiT", "MDTv2"])
def test_a_sample_decides_alone(name, params, family, models, tmp_path):
    """One sample's decisions and image are the same alone and in a batch (rows deciding both ways)."""
    model = models[family]
    if name == "teacache":
        path = calibration_file(tmp_path / "c.pt", "teacache", model, SAMPLER,
                                coefficients=torch.tensor(POLY, dtype=torch.float64))
        if params["cfg"] == "separate":
            from tokencache.cache.calibration import save_calibration

            method = get_method("teacache", cfg="separate")
            save_calibration(path, method, model, parse_sampler(SAMPLER),
                             {"coefficients": torch.tensor(POLY, dtype=torch.float64)})
        params = dict(params, coefficients=path)
    together, batch, engine = engine_run(model, get_method(name, **params), indices=range(6))
    history = engine.method.state.history
    mixed = [entry["reuse"] for entry in history if 0 < entry["reuse"].sum() < 12]
    assert mixed, "no step where some rows reuse and others compute"
    if params["cfg"] == "separate":
        assert any(bool(e["reuse"][i]) != bool(e["reuse"][i + 6]) for e in history for i in range(6))
    for i in (0, 3):
        alone, single, one = engine_run(model, get_method(name, **params), indices=[i])
        assert torch.equal(alone[0], together[i])
        assert ([(bool(e["reuse"][0]), bool(e["reuse"][1])) for e in one.method.state.history]
                == [(bool(e["reuse"][i]), bool(e["reuse"][i + 6])) for e in history])
        assert [s for s, _ in single[0]] == [s for s, _ in batch[i]]  # the signal too, bit for bit


def test_teacache_forced_steps(models, tmp_path):
    """ret_steps / final_steps: the first and last steps compute; a huge ret_steps computes everything."""
    model = models["DiT"]
    path = calibration_file(tmp_path / "c.pt", "teacache", model, SAMPLER,
                            coefficients=torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    _, ours, _ = engine_run(model, get_method("teacache", coefficients=path, ret_steps=5, final_steps=3), indices=[0])
    reuse = [r for _, r in ours[0]]
    assert reuse == [False] * 5 + [True] * 32 + [False] * 3  # poly ≡ 0: every unforced step reuses
    _, ours, _ = engine_run(model, get_method("teacache", coefficients=path, ret_steps=5, final_steps=0), indices=[0])
    assert [r for _, r in ours[0]] == [False] * 5 + [True] * 35


# ----------------------------------------------------------------------------------------- calibration


def teacache_module():
    return __import__(method_class("teacache").__module__, fromlist=["fit_polynomial"])


def test_teacache_fit_recovers_known_coefficients():
    module = teacache_module()
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 0.6, 400)
    truth = np.array([3.0, -2.0, 0.5, 0.9, 0.02])
    exact = module.fit_polynomial(x, np.poly1d(truth)(x), 4)
    np.testing.assert_allclose(exact["coefficients"], truth, rtol=1e-6, atol=1e-9)
    assert exact["r2"] == pytest.approx(1.0) and exact["rmse"] < 1e-9 and exact["points"] == 400
    noise = rng.normal(0.0, 0.01, x.size)
    noisy = module.fit_polynomial(np.append(x, np.nan), np.append(np.poly1d(truth)(x) + noise, 1.0), 4)
    assert noisy["dropped"] == 1 and noisy["rmse"] == pytest.approx(0.01, rel=0.2) and 0.9 < noisy["r2"] < 1
    # np.poly1d evaluation, Horner in float64, leading zeros dropped
    values = torch.tensor([0.0, 0.3, 1.7], dtype=torch.float64)
    coefficients = [0.0, 0.0, 1.5, -0.25, 0.125]
    got = module.polyval(module.trim_leading_zeros(coefficients), values)
    assert got.tolist() == [float(np.poly1d(coefficients)(v)) for v in values.tolist()]
    assert module.trim_leading_zeros([0.0, 0.0]) == [0.0]


def test_teacache_calibration_file_round_trips(models, tmp_path):
    """calibrate → file → load: the coefficients, the fit's R² and RMSE reach resolved(); the points are the
    signal the method measures (a full run: rel at every unforced step); another sampler is refused."""
    model = models["DiT"]
    method = get_method("teacache")
    settings = method_class("teacache").calibration(num_samples=3, batch_size=2, seed=5)
    out = tmp_path / "coefficients.pt"
    summary = calibrate(method, model, "ddim8", settings, SamplingSettings(cfg_scale=2.0, clip_denoised=True), out=out)
    assert summary["points"] == 3 * 7 and len(summary["coefficients"]) == 5
    assert np.isfinite(summary["r2"]) and summary["rmse"] >= 0
    tensors = load_calibration(method, out, model, "ddim8")
    assert tensors["points_x"].shape == (3, 7)
    assert torch.equal(tensors["coefficients"], torch.tensor(summary["coefficients"], dtype=torch.float64))
    with attach(model, get_method("teacache", coefficients=str(out), threshold=0.0), "ddim8") as engine:
        gens = sample_generators(5, [1])
        generate(model, engine.sampler, draw_labels(gens, 10), gens, cfg_scale=2.0, clip_denoised=True,
                 step_listener=engine.step_listener)
    resolved = engine.summary()["resolved"]
    assert resolved["fit_r2"] == pytest.approx(summary["r2"]) and resolved["fit_rmse"] == pytest.approx(summary["rmse"])
    history = engine.method.state.history
    for k in range(1, len(history) - 1):  # up to the first reuse the run is the full trajectory the fit measured
        assert float(history[k]["rel"][0]) == float(tensors["points_x"][1, k - 1])
        if history[k]["reuse"].any():
            break
    with pytest.raises(CalibrationError, match="sampler"):
        load_calibration(method, out, model, "ddim10")
    with pytest.raises(CalibrationError, match="teacache-per-row"):  # per-row decisions need their own fit
        load_calibration(get_method("teacache", cfg="separate"), out, model, "ddim8")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    assert method_class("teacache").calibration().figure(tensors, ax, "t")
    plt.close(fig)


def test_overhead_prices(models, tmp_path):
    from tokencache.metrics.flops import model_shape

    shape = model_shape(models["DiT"])
    path = calibration_file(tmp_path / "c.pt", "teacache", models["DiT"], SAMPLER,
                            coefficients=torch.tensor(POLY, dtype=torch.float64))
    tea = get_method("teacache", coefficients=path)
    n, d = shape.tokens, shape.hidden
    assert tea.overhead_macs(shape)["signal_modulation"] == 6 * d * d + 4 * n * d
    assert tea.traced_overhead == ()  # a trace drops it unless rows split (see the test above)
    assert get_method("fbcache").overhead_macs(shape) == {"residual_values": 1, "signal_values": 3}


def _fvcore_macs(model, inputs) -> int:
    from tokencache.metrics.flops import count_macs

    return count_macs(model, *inputs)


@pytest.mark.parametrize("name", ["fbcache", "teacache"])
def test_macs_from_counts_equal_fvcore_when_rows_split(name, models, tmp_path):
    """As the contract test, at thresholds where some rows of a step reuse and others compute: the rows
    that compute pay the attention's LayerNorm and keys/values (``branch_rows``). TeaCache's signal
    (block 0's adaLN and LayerNorm) feeds only the host's decision, so a trace drops it unless the
    step's rows split, when the engine's row selection depends on it: it shows up on those steps."""
    from tokencache.metrics.flops import model_shape, sampling_macs

    model = models["DiT"]
    params = dict(threshold=1.0)
    if name == "teacache":
        params = dict(threshold=3.0, coefficients=calibration_file(
            tmp_path / "c.pt", "teacache", model, "ddim8", coefficients=torch.tensor([0.0, 0, 0, 1, 0])))
    sampler = parse_sampler("ddim8")
    g = torch.Generator().manual_seed(0)
    rows = 6
    x = torch.randn(rows, model.in_channels, model.input_size, model.input_size, generator=g)
    y = torch.arange(rows) % 10
    timesteps = sampler.diffusion().timestep_map
    traced = 0
    with attach(model, get_method(name, **params), sampler) as engine:
        for k in range(sampler.steps):
            engine.begin_step(k)
            x = x + 0.3 * (k % 3) * torch.randn(x.shape, generator=g)
            t = torch.full((rows,), int(timesteps[sampler.steps - 1 - k]))
            traced += _fvcore_macs(model, (x, t, y))
    split = sum(0 < int(e["reuse"].sum()) < rows for e in engine.method.state.history)
    assert split >= 2
    priced = sampling_macs(model, engine.summary(counts=True), cfg=False)
    signal = engine.method.overhead_macs(model_shape(model)).get("signal_modulation", 0) * rows * split
    assert traced == pytest.approx(priced["macs_per_image"] * rows + signal, abs=rows)  # per-image rounding


def test_a_run_averages_per_row_arrays_over_its_batches():
    """Runtime-signal methods decide per sample, so blocks_run and branch_rows differ between batches."""
    from tokencache.run import combine_cache_summaries

    def part(blocks, rows):
        return {"counts": [[[rows * 4, rows * 4]]], "blocks_run": [[blocks]], "branch_rows": [[[rows, rows]]],
                "skipped_fraction": 0.0}

    merged = combine_cache_summaries([(3, part(1.0, 1.0)), (1, part(0.0, 0.0))])
    assert merged["blocks_run"] == [[0.75]] and merged["branch_rows"] == [[[0.75, 0.75]]]
    assert merged["counts_per_sample"] == [[[3.0, 3.0]]] and "counts" not in merged
