"""The baseline methods: no-op settings equal `full`, schedules and counts, batch independence, L2C."""
import math
import sys

import pytest
import torch

from conftest import TINY, calibration_file, randomize
from tokencache.cache import SamplingSettings, attach, calibrate, get_method, load_calibration
from tokencache.models import create_model
from tokencache.sampling import draw_labels, generate, parse_sampler, sample_generators

N_TOKENS = 16  # TINY: 8×8 input at patch 2



@pytest.fixture
def tiny_mdt_v1():
    return randomize(create_model("MDT", **TINY, decode_layer=2)).eval()


def run(model, method, sampler, indices, seed=3, cfg_scale=2.0):
    """(samples, engine) of ``method`` on samples ``indices`` of run ``seed``."""
    with attach(model, method, sampler) as engine:
        gens = sample_generators(seed, indices)
        x = generate(model, engine.sampler, draw_labels(gens, 10), gens, cfg_scale=cfg_scale, clip_denoised=True,
                     step_listener=engine.step_listener)
    return x, engine


def router_file(tmp_path, model, sampler, logits, name="router.pt"):
    return calibration_file(tmp_path / name, "l2c", model, sampler, logits=logits)


def random_logits(model, steps, seed=0):
    return torch.randn(steps, model.block_count, 2, generator=torch.Generator().manual_seed(seed)) * 3


# ---------------------------------------------------------------------- no-op settings


NOOP = {
    "fora": dict(interval=1),
    "toca-all-fresh": dict(schedule="constant", fresh_ratio=1.0, module_weight=0.0, partial_attention=True),
    "toca-all-full": dict(interval=1, interval_weight=0.0, sensitive_interval=1),
    "deepcache": dict(interval=1),
    "steps": dict(num_steps=12),
}


@pytest.mark.parametrize("family", ["dit", "mdtv2", "mdtv1"])
def test_noop_settings_equal_full(family, tiny_dit, tiny_mdt, tiny_mdt_v1, tmp_path):
    model = {"dit": tiny_dit, "mdtv2": tiny_mdt, "mdtv1": tiny_mdt_v1}[family]
    want, _ = run(model, "full", "ddim12", range(3))
    configs = dict(NOOP, l2c=dict(router=router_file(tmp_path, model, "ddim12", torch.full((12, 4, 2), 5.0))))
    if family == "mdtv2":
        configs["deepcache"] = dict(interval=1, shallow_blocks=0)
    for label, params in configs.items():
        got, engine = run(model, get_method(label.split("-")[0], **params), "ddim12", range(3))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=label)
        assert (engine.counts == N_TOKENS).all(), label


# ---------------------------------------------------------------------- schedules and counts


def test_fora_reuses_everything_between_full_steps(tiny_dit):
    _, engine = run(tiny_dit, get_method("fora", interval=3), "ddim50", range(2))
    counts = engine.counts
    full = [k for k in range(50) if (counts[k] == N_TOKENS).all()]
    assert full == [0] + list(range(1, 50, 3)) and len(full) == 18  # i = 49, then i % 3 == 0: 48, 45, …, 0
    assert (counts[[k for k in range(50) if k not in full]] == 0).all()
    summary = engine.summary()
    assert summary["full_steps"] == 18 and summary["skipped_fraction"] == pytest.approx(32 / 50)
    assert summary["blocks_run_fraction"] == 1.0 and summary["rows"] == 4  # CFG: 2 rows per sample


def test_deepcache_counts(tiny_dit, tiny_mdt):
    _, engine = run(tiny_dit, get_method("deepcache", interval=3, shallow_blocks=1), "ddim20", range(2))
    counts = engine.counts
    for k in range(20):
        if k % 3 == 0:
            assert (counts[k] == N_TOKENS).all()
        else:  # blocks 0 and 3 every step, the span 1…2 reused through its residual
            assert (counts[k, [0, 3]] == N_TOKENS).all() and (counts[k, 1:3] == 0).all()
    # MDTv2 (encoder in 0, out 1, decoder 2–3): with k = 0 the U span is the encoder, 0…1
    _, engine = run(tiny_mdt, get_method("deepcache", interval=2, shallow_blocks=0), "ddim20", range(2))
    counts = engine.counts
    assert (counts[0::2] == N_TOKENS).all()
    assert (counts[1::2, :2] == 0).all() and (counts[1::2, 2:] == N_TOKENS).all()
    with pytest.raises(ValueError, match="leaves no block to cache"):
        run(tiny_mdt, get_method("deepcache", shallow_blocks=1), "ddim20", [0])


# ---------------------------------------------------------------------- peer equivalence (official rules)

#: samplers of the peer tests: the official settings and a short odd-length one
PEER_SAMPLERS = ["ddpm250", "ddim50", "ddim7", "ddpm9"]


def toca_record(engine):
    """(types, mlp tokens) per (step, block) as the engine recorded them."""
    counts = engine.counts
    types = [["full" if (counts[k, layer] == N_TOKENS).all() else "ToCa" for layer in range(counts.shape[1])]
             for k in range(counts.shape[0])]
    return types, counts[..., 1].tolist()


@pytest.mark.parametrize("sampler", PEER_SAMPLERS)
def test_toca_matches_the_official_per_block_rules(tiny_dit, sampler):
    from official_rules import toca_official

    spec = parse_sampler(sampler)
    ddpm = spec.loop == "ddpm"
    _, engine = run(tiny_dit, get_method("toca"), sampler, range(2))
    types, mlp, _ = toca_official(spec.steps, 4, N_TOKENS, 0.07, 4 if ddpm else 3,
                                  "ToCa-ddpm250" if ddpm else "ToCa-ddim50")
    got_types, got_mlp = toca_record(engine)
    assert got_types == types and got_mlp == mlp
    counts = engine.counts
    for k in range(spec.steps):
        for layer in range(4):  # attention: all tokens on full blocks, reused on ToCa blocks
            assert counts[k, layer, 0] == (N_TOKENS if types[k][layer] == "full" else 0)
    if sampler == "ddim50":  # a full block 0 followed by ToCa blocks: the per-block re-test
        assert [49 - k for k in range(50) if types[k][0] == "full" and types[k][1] == "ToCa"] == [45, 32]


def test_toca_per_block_retest_at_dit_xl_depth():
    """At 28 blocks: the steps where only block 0 is full, as the issue found on DiT-XL/2."""
    from official_rules import toca_official

    toca = sys.modules[type(get_method("toca")).__module__]
    for sampler, n, schedule, only_block0 in (("ddpm250", 4, "ToCa-ddpm250", [245, 155]),
                                              ("ddim50", 3, "ToCa-ddim50", [45, 32])):
        steps = parse_sampler(sampler).steps
        types, mlp, _ = toca_official(steps, 28, 256, 0.07, n, schedule)
        plan = toca.full_blocks(steps, 28, n, 0.07, 0.4, 2)
        assert [[t == "full" for t in row] for row in types] == plan
        assert [steps - 1 - k for k in range(steps) if plan[k][0] and not plan[k][1]] == only_block0
        for k in range(steps):
            for layer in range(28):
                if not plan[k][layer]:
                    assert toca.fresh_tokens(schedule, 0.07, steps - 1 - k, steps, layer, 28, "mlp", 2.5, 256) \
                        == mlp[k][layer]
        once = toca.full_blocks(steps, 28, n, 0.07, 0.4, 2, per_block_retest=False)
        assert all(row == [row[0]] * 28 for row in once) and [r[0] for r in once] == [r[0] for r in plan]


def test_toca_chooses_the_official_tokens(tiny_dit):
    """End to end on a random DiT: every MLP subset equals the official score's top-k."""
    from official_rules import toca_official

    method = get_method("toca")
    maps, chosen = {}, {}
    observe, decide = method.observe, method.branch_action
    state = {"step": None}

    def spy_observe(step, block, branch, *, x, output, attention, rows):
        if attention is not None:
            maps[(step, block)] = attention.mean(dim=1)
        observe(step, block, branch, x=x, output=output, attention=attention, rows=rows)

    def spy_decide(step, block, branch):
        action = decide(step, block, branch)
        if branch == "mlp" and type(action).__name__ == "Subset":
            chosen[(step, block)] = action.tokens.clone()
        return action

    method.observe, method.branch_action = spy_observe, spy_decide
    run(tiny_dit, method, "ddim50", range(3))
    _, _, official = toca_official(50, 4, N_TOKENS, 0.07, 3, "ToCa-ddim50", attention_maps=lambda k, l: maps[(k, l)])
    partial = {key: value for key, value in official.items() if 0 < value.shape[1] < N_TOKENS}
    assert partial and set(partial) == set(chosen)
    for key, tokens in partial.items():
        assert torch.equal(chosen[key], tokens), key


@pytest.mark.parametrize("sampler", PEER_SAMPLERS + ["ddpm50"])
@pytest.mark.parametrize("interval", [2, 3, 4])
def test_fora_matches_the_official_down_counting_phase(tiny_dit, sampler, interval):
    from official_rules import fora_official

    steps = parse_sampler(sampler).steps
    _, engine = run(tiny_dit, get_method("fora", interval=interval), sampler, [0])
    full = fora_official(steps, interval)
    counts = engine.counts
    assert [bool((counts[k] == N_TOKENS).all()) for k in range(steps)] == full
    assert all((counts[k] == 0).all() for k in range(steps) if not full[k])
    if sampler == "ddpm50" and interval == 3:
        assert [49 - k for k in range(50) if full[k]][:4] == [49, 48, 45, 42]


@pytest.mark.parametrize("sampler", ["ddim50", "ddim20", "ddpm250", "ddim7"])
def test_l2c_matches_the_official_routing(tiny_dit, tmp_path, sampler):
    from official_rules import l2c_official

    steps = parse_sampler(sampler).steps
    logits = random_logits(tiny_dit, steps, seed=steps)
    path = router_file(tmp_path, tiny_dit, sampler, logits)
    _, engine = run(tiny_dit, get_method("l2c", router=path, threshold=0.1), sampler, [0])
    plan = l2c_official(steps, torch.sigmoid(logits), 0.1)
    computed = (engine.counts == N_TOKENS).tolist()
    assert computed == [[list(b) for b in row] for row in plan]
    assert ((engine.counts == 0) | (engine.counts == N_TOKENS)).all()


def test_toca_picks_the_best_token_of_each_cell():
    from tokencache.baselines._scores import spatial_bonus

    score = torch.arange(16.0).view(1, 16)  # 4×4 grid: cell maxima at 5, 7, 13, 15
    out = spatial_bonus(score, 0.6, 4)
    bonus = torch.zeros(16)
    bonus[[5, 7, 13, 15]] = score[0, [5, 7, 13, 15]] * 0.6
    torch.testing.assert_close(out[0], score[0] + bonus)


def test_l2c_reuses_exactly_what_the_router_says(tiny_dit, tmp_path):
    logits = random_logits(tiny_dit, 20)
    path = router_file(tmp_path, tiny_dit, "ddim20", logits)
    _, engine = run(tiny_dit, get_method("l2c", router=path, threshold=0.1), "ddim20", range(2))
    counts = engine.counts
    for k in range(20):
        i = 19 - k  # the router's respaced index
        if i % 2 == 1 or i == 19:
            assert (counts[k] == N_TOKENS).all()
        else:
            reuse = torch.sigmoid(logits[i]) <= 0.1
            assert ((counts[k] == 0) == reuse.numpy()).all() and ((counts[k] == N_TOKENS) | (counts[k] == 0)).all()
    assert engine.summary()["skipped_fraction"] > 0


def test_l2c_router_is_tied_to_model_and_sampler(tiny_dit, tmp_path):
    path = router_file(tmp_path, tiny_dit, "ddim20", random_logits(tiny_dit, 20))
    with pytest.raises(ValueError, match="made for sampler ddim20"):
        run(tiny_dit, get_method("l2c", router=path), "ddim10", [0])
    other = randomize(create_model("DiT", **TINY), seed=1).eval()
    with pytest.raises(ValueError, match="other weights"):
        run(other, get_method("l2c", router=path), "ddim20", [0])
    deeper = randomize(create_model("DiT", **dict(TINY, depth=5))).eval()
    with pytest.raises(ValueError, match="made for model"):
        load_calibration(get_method("l2c"), path, deeper)
    with pytest.raises(ValueError, match="does not exist"):
        run(tiny_dit, get_method("l2c", router=str(tmp_path / "missing.pt")), "ddim20", [0])
    with pytest.raises(ValueError, match="set router=PATH"):
        run(tiny_dit, get_method("l2c"), "ddim20", [0])
    predictor = calibration_file(tmp_path / "p.pt", "tokencache", tiny_dit, "ddim20", logits=torch.zeros(20, 4, 16))
    with pytest.raises(ValueError, match="is not a tokencache L2C router"):
        run(tiny_dit, get_method("l2c", router=predictor), "ddim20", [0])


def test_train_router_learns_only_routed_steps(tiny_dit, tmp_path):
    out = tmp_path / "trained.pt"
    flags = [p.requires_grad for p in tiny_dit.parameters()]
    weights = {k: v.clone() for k, v in tiny_dit.state_dict().items()}
    l2c = get_method("l2c")
    summary = calibrate(l2c, tiny_dit, "ddim6", l2c.calibration(steps=4, batch_size=2, num_samples=3, lr=0.1, l1=1e-3,
                                                                seed=11), SamplingSettings(cfg_scale=2.0), out=out)
    assert summary["file"] == str(out) and summary["routed_modules"] == 3 * 4 * 2
    assert [p.requires_grad for p in tiny_dit.parameters()] == flags and tiny_dit.cache_context is None
    assert all(torch.equal(v, tiny_dit.state_dict()[k]) for k, v in weights.items())  # the backbone is frozen
    logits = load_calibration(l2c, out, tiny_dit, "ddim6")["logits"]
    initial = torch.randn(6, 4, 2, generator=torch.Generator().manual_seed(11))
    assert (logits.abs() <= 5).all()
    torch.testing.assert_close(logits[1::2], initial[1::2])  # odd indices are full steps: never trained
    assert not torch.allclose(logits[0::2], initial[0::2])
    _, engine = run(tiny_dit, get_method("l2c", router=str(out)), "ddim6", [0])
    assert engine.summary()["steps_run"] == 6


def test_steps_changes_the_sampler(tiny_dit):
    got, engine = run(tiny_dit, get_method("steps", num_steps=10), "ddim20", range(2))
    assert engine.sampler.name == "ddim10"
    assert engine.summary()["token_fraction_of_requested"] == 0.5 and engine.summary()["token_fraction"] == 1.0
    want, _ = run(tiny_dit, "full", "ddim10", range(2))
    assert torch.equal(got, want)
    method = get_method("steps", num_steps=25)
    assert method.transform_sampler(parse_sampler("ddim50-int")).name == "ddim25-int"
    assert method.transform_sampler(parse_sampler("ddpm250")).name == "ddpm25"
    with pytest.raises(ValueError, match="exceeds"):
        method.transform_sampler(parse_sampler("ddim20"))
    assert engine.summary()["resolved"]["num_steps"] == 10 and engine.summary()["role"] == "fewer-steps"
