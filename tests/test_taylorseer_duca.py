"""TaylorSeer and DuCa against independent transcriptions of their official DiT code (official_rules.py).

Schedules per step and block on DDIM-50, DDPM-250 and short odd samplers; end to end on a random
tiny DiT: every TaylorSeer forecast equals the official ``taylor_formula`` of the outputs the
engine computed on full steps (``torch.equal``), DuCa's recomputed tokens equal the official
score's top k, and a DuCa aggressive step hands the final layer exactly the previous output of
the last block.
"""
import sys

import pytest
import torch

from conftest import TINY, randomize
from official_rules import duca_official, taylorseer_official
from tokencache.cache import Forecast, Subset, attach, get_method
from tokencache.models import create_model
from tokencache.sampling import draw_labels, generate, parse_sampler, sample_generators

N_TOKENS = 16  # TINY: 8×8 input at patch 2
BLOCKS = TINY["depth"]
SAMPLERS = ["ddim50", "ddpm250", "ddim7", "ddpm9"]


def run(model, method, sampler, indices=range(2), seed=3):
    with attach(model, method, sampler) as engine:
        gens = sample_generators(seed, indices)
        x = generate(model, engine.sampler, draw_labels(gens, 10), gens, cfg_scale=2.0, clip_denoised=True,
                     step_listener=engine.step_listener)
    return x, engine


def module(name):
    return sys.modules[type(get_method(name)).__module__]


# ---------------------------------------------------------------------------------- TaylorSeer


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("interval, order", [(4, 4), (3, 3), (5, 2)])
def test_taylorseer_matches_the_official_schedule(tiny_dit, sampler, interval, order):
    steps = parse_sampler(sampler).steps
    types, held, _ = taylorseer_official(steps, BLOCKS, interval, order)
    _, engine = run(tiny_dit, get_method("taylorseer", interval=interval, max_order=order), sampler, [0])
    counts, blocks_run = engine.counts, engine.blocks_run
    assert [("full" if (counts[k] == N_TOKENS).all() else "Taylor") for k in range(steps)] == types
    assert all((counts[k] == 0).all() for k in range(steps) if types[k] == "Taylor")
    assert (blocks_run == 1).all()  # a Taylor block still runs (its adaLN gates the forecasts)
    method = engine.method
    assert [h for h, t in zip(held, types) if t == "full"] == [h for h, f in zip(method.plan.held, method.plan.full) if f]
    if sampler == "ddim50":  # full at k = 0, 1, then every N-th step: 14 / 18 / 11 full steps
        assert sum(t == "full" for t in types) == {4: 14, 3: 18, 5: 11}[interval]
        assert (types[-1] == "full") == ((steps - 2) % interval == 0)  # no forced last step


@pytest.mark.parametrize("sampler, interval, order", [("ddim50", 4, 4), ("ddpm9", 3, 2), ("ddim20", 3, 3)])
def test_taylorseer_forecasts_equal_the_official_formula(tiny_dit, sampler, interval, order):
    """End to end: each forecast the engine used is the official one, bit for bit."""
    steps = parse_sampler(sampler).steps
    method = get_method("taylorseer", interval=interval, max_order=order)
    outputs, forecasts, held = {}, {}, {}
    observe, decide = method.observe, method.branch_action

    def spy_observe(step, block, branch, *, x, output, attention, rows):
        outputs[(step, block, branch)] = output.clone()
        observe(step, block, branch, x=x, output=output, attention=attention, rows=rows)
        held[step] = len(method.state.factors[(0, "attn")])

    def spy_decide(step, block, branch):
        action = decide(step, block, branch)
        if isinstance(action, Forecast):
            forecasts[(step, block, branch)] = action.output.clone()
        return action

    method.observe, method.branch_action = spy_observe, spy_decide
    run(tiny_dit, method, sampler, range(3))
    types, official_held, official = taylorseer_official(steps, BLOCKS, interval, order,
                                                         features=lambda k, l, m: outputs[(k, l, m)])
    taylor_steps = sum(t == "Taylor" for t in types)
    assert set(forecasts) == set(official) and len(official) == taylor_steps * BLOCKS * 2 > 0
    for key, value in official.items():
        assert forecasts[key].dtype == outputs[(0, 0, key[2])].dtype  # the factors' dtype, no upcast
        assert torch.equal(forecasts[key], value), key
    assert held == {k: official_held[k] for k in range(steps) if types[k] == "full"}
    assert [held[k] for k in sorted(held)][:order + 2] == list(range(1, order + 2)) + [order + 1]
    resolved = method.resolved()
    assert resolved["stored_factors"] == order + 1
    assert resolved["peak_values_per_row"] == (order + 1) * 2 * BLOCKS * N_TOKENS * 32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_taylorseer_arithmetic_keeps_the_outputs_dtype(tiny_dit, dtype):
    """The method driven directly with outputs of another dtype: the official arithmetic in that dtype."""
    from tokencache.cache import Compute
    from tokencache.cache.engine import model_info

    method = get_method("taylorseer")
    method.setup(model_info(tiny_dit, parse_sampler("ddim20")))
    method.state = method.State()
    g = torch.Generator().manual_seed(0)
    outputs, forecasts = {}, {}
    for step in method.info.steps:  # the hooks' Step objects, as the engine hands them
        k = step.k
        method.begin_step(step)
        for block in range(BLOCKS):
            for branch in ("attn", "mlp"):
                action = method.branch_action(step, block, branch)
                if isinstance(action, Compute):
                    out = (torch.randn(2, N_TOKENS, 32, generator=g) * (1 + k)).to(dtype)
                    outputs[(k, block, branch)] = out
                    method.observe(step, block, branch, x=None, output=out, attention=None, rows=None)
                else:
                    forecasts[(k, block, branch)] = action.output
    _, _, official = taylorseer_official(20, BLOCKS, 4, 4, features=lambda k, l, m: outputs[(k, l, m)])
    assert set(official) == set(forecasts) and official
    for key, value in official.items():
        assert value.dtype == dtype and torch.equal(forecasts[key], value), key


def test_taylorseer_memory_and_overhead_at_official_settings(tiny_dit):
    _, engine = run(tiny_dit, get_method("taylorseer", interval=3, max_order=3), "ddim50", [0])
    summary = engine.summary()
    resolved = summary["resolved"]
    assert resolved["full_steps"] == 18 and resolved["stored_factors"] == 4
    assert resolved["stored_values_per_row"] == resolved["peak_values_per_row"] == 4 * 2 * BLOCKS * N_TOKENS * 32
    terms = summary["overhead"]["taylor_terms"]["per_step"]
    full = engine.method.plan.full
    assert all((terms[k] == 0) == full[k] for k in range(50))
    # a Taylor step with m factors evaluates m terms per value of each branch output
    held = engine.method.plan.held
    assert all(terms[k] == held[k] * 2 * BLOCKS * N_TOKENS * 32 for k in range(50) if not full[k])


def test_taylorseer_final_full_steps_is_opt_in(tiny_dit):
    ts = module("taylorseer")
    assert ts.full_steps(20, 4)[-2:] == [False, False]  # official: the last two steps forecast
    assert ts.full_steps(20, 4, final_full_steps=3)[-3:] == [True, True, True]
    with pytest.raises(ValueError, match="first_enhance"):
        get_method("taylorseer", first_enhance=0)


# ---------------------------------------------------------------------------------------- DuCa


def duca_record(engine):
    """Per (step, block): the type the engine's counts show, and the MLP tokens."""
    counts, run_ = engine.counts, engine.blocks_run
    types = []
    for k in range(counts.shape[0]):
        row = []
        for layer in range(counts.shape[1]):
            if run_[k, layer] == 0:
                row.append("aggressive")
            elif counts[k, layer, 0] == N_TOKENS:
                row.append("full")
            else:
                row.append("ToCa")
        types.append(row)
    return types, counts[..., 1].tolist()


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("interval, ratio", [(3, 0.05), (4, 0.07), (3, 0.3)])
def test_duca_matches_the_official_per_block_rules(tiny_dit, sampler, interval, ratio):
    steps = parse_sampler(sampler).steps
    types, mlp, _ = duca_official(steps, BLOCKS, N_TOKENS, ratio, interval)
    _, engine = run(tiny_dit, get_method("duca", interval=interval, fresh_ratio=ratio), sampler, [0])
    got_types, got_mlp = duca_record(engine)
    assert got_types == types and got_mlp == mlp
    counts = engine.counts
    for k in range(steps):
        for layer in range(BLOCKS):  # attention: all tokens on full blocks, reused (or skipped) elsewhere
            assert counts[k, layer, 0] == (N_TOKENS if types[k][layer] == "full" else 0)
    if sampler == "ddim50" and interval == 3:  # the per-block re-test: a full block 0, then ToCa / aggressive
        mixed = [(49 - k, types[k][1]) for k in range(50) if types[k][0] == "full" and types[k][1] != "full"]
        assert mixed == [(45, "ToCa"), (32, "aggressive")]


def test_duca_at_dit_xl_depth():
    """28 blocks, 256 tokens, DDIM-50, N = 3, R = 0.05: the module's plan is the official one."""
    duca = module("duca")
    types, mlp, _ = duca_official(50, 28, 256, 0.05, 3)
    plan = duca.block_types(50, 28, 3, 0.05)
    assert plan == types
    flat = [t for row in types for t in row]
    assert (flat.count("full"), flat.count("ToCa"), flat.count("aggressive")) == (506, 643, 251)
    for k in range(50):
        for layer in range(28):
            if types[k][layer] == "ToCa":
                ratio = duca.scheduled_ratio("ToCa", 0.05, 49 - k, 50, layer, 28, 3)
                assert duca.fresh_count(ratio, 256) == mlp[k][layer]
    assert [mlp[48][0], mlp[48][27]] == [74, 112] and mlp[12][0] == 1  # s = 1 and s = 37
    once = duca.block_types(50, 28, 3, 0.05, per_block_retest=False)
    assert all(row == [row[0]] * 28 for row in once) and [r[0] for r in once] == [r[0] for r in plan]


def test_duca_chooses_the_official_tokens(tiny_dit):
    """End to end on a random DiT: every MLP subset equals the official score's top k (bonus 0.8)."""
    method = get_method("duca", fresh_ratio=0.2)
    maps, chosen = {}, {}
    observe, decide = method.observe, method.branch_action

    def spy_observe(step, block, branch, *, x, output, attention, rows):
        if attention is not None:
            maps[(step, block)] = attention.mean(dim=1)
        observe(step, block, branch, x=x, output=output, attention=attention, rows=rows)

    def spy_decide(step, block, branch):
        action = decide(step, block, branch)
        if branch == "mlp" and isinstance(action, Subset):
            chosen[(step, block)] = action.tokens.clone()
        return action

    method.observe, method.branch_action = spy_observe, spy_decide
    run(tiny_dit, method, "ddim50", range(3))
    _, _, official = duca_official(50, BLOCKS, N_TOKENS, 0.2, 3, attention_maps=lambda k, l: maps[(k, l)])
    partial = {key: value for key, value in official.items() if 0 < value.shape[1] < N_TOKENS}
    assert partial and set(partial) == set(chosen)
    for key, tokens in partial.items():
        assert torch.equal(chosen[key], tokens), key


@pytest.mark.parametrize("family", ["DiT", "MDTv2"])
def test_duca_aggressive_step_returns_the_previous_last_block_output(family, tiny_dit, tiny_mdt):
    model = tiny_dit if family == "DiT" else tiny_mdt
    final_inputs = {}
    method = get_method("duca")
    with attach(model, method, "ddim50") as engine:
        hook = model.final_layer.register_forward_pre_hook(
            lambda mod, args: final_inputs.__setitem__(engine.step, args[0].clone()))
        try:
            gens = sample_generators(3, range(2))
            generate(model, engine.sampler, draw_labels(gens, 10), gens, cfg_scale=2.0, clip_denoised=True,
                     step_listener=engine.step_listener)
        finally:
            hook.remove()
    types = method.plan.types
    aggressive = [k for k in range(50) if types[k][-1] == "aggressive"]
    assert 49 - 17 in [49 - k for k in aggressive]  # s = 32: block 0 full, the rest aggressive
    assert len(aggressive) == 9
    for k in aggressive:
        assert torch.equal(final_inputs[k], final_inputs[k - 1]), k
        assert (engine.blocks_run[k][types[k].index("aggressive"):] == 0).all()
    for k in range(1, 50):  # the blocks ran: the final layer sees a new residual stream
        if k not in aggressive:
            assert not torch.equal(final_inputs[k], final_inputs[k - 1]), k


def test_new_methods_noop_equals_full(tiny_dit):
    want, _ = run(tiny_dit, "full", "ddim12", range(2))
    for name in ("taylorseer", "duca"):
        got, engine = run(tiny_dit, get_method(name, **type(get_method(name)).noop), "ddim12", range(2))
        assert torch.equal(got, want), name
        assert (engine.counts == N_TOKENS).all()


@pytest.mark.parametrize("orders", [1, 2, 5])
@pytest.mark.parametrize("x", [-1, -3, -4, 2])
def test_in_place_forecast_is_the_official_expression_bit_for_bit(orders, x):
    """``taylor_utils.taylor_formula``: output = 0, then output += (1/i!)·F_i·x**i, as written there."""
    import math

    from tokencache.baselines.taylorseer import taylor_forecast

    gen = torch.Generator().manual_seed(orders * 10 + x)
    factors = [torch.randn(3, 16, 8, generator=gen) * 10.0 ** -k for k in range(orders)]
    factors[0][0, 0, :3] = torch.tensor([-0.0, 0.0, float("inf")])  # signed zeros and inf follow the same rules
    official = 0
    for i in range(orders):
        official = official + (1 / math.factorial(i)) * factors[i] * (x ** i)
    ours = taylor_forecast([f.clone() for f in factors], x)
    assert torch.equal(ours.view(torch.int32), official.view(torch.int32))  # the bits, signs of zero included
