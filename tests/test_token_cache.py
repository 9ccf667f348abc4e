"""TokenCache: the TPRR schedule, adaptive block selection, the predictor file and its training, and
the method's equalities with `full` and its token counts."""
import pytest
import torch

from conftest import TINY, calibration_file, randomize
from tokencache.baselines._tokencache_predictor import _TokenRelaxation, importance
from tokencache.baselines.tokencache import adaptive_blocks, tprr_schedule
from tokencache.cache import SamplingSettings, attach, calibrate, get_method, load_calibration
from tokencache.cache.calibration import read_calibration_file
from tokencache.cache.engine import CacheEngine
from tokencache.models import create_model
from tokencache.sampling import draw_labels, generate, sample_generators

N_TOKENS, BLOCKS = 16, 4  # TINY: 8×8 input at patch 2, depth 4



def run(model, method, sampler, indices, seed=3, cfg_scale=2.0):
    with attach(model, method, sampler) as engine:
        gens = sample_generators(seed, indices)
        x = generate(model, engine.sampler, draw_labels(gens, 10), gens, cfg_scale=cfg_scale, clip_denoised=True,
                     step_listener=engine.step_listener)
    return x, engine


def predictor_file(tmp_path, model, sampler, steps, seed=0):
    logits = torch.randn(steps, model.block_count, model.num_tokens, generator=torch.Generator().manual_seed(seed))
    path = calibration_file(tmp_path / f"predictor-{sampler}.pt", "tokencache", model, sampler, logits=logits)
    return path, torch.sigmoid(logits)


# ---------------------------------------------------------------------- schedule and block choice


def test_tprr_schedule_i_steps():
    def i_steps(*args):
        return [s for s, full in enumerate(tprr_schedule(*args)) if full]

    assert i_steps(10, 3, 1, 0.5) == [0, 4, 6, 8]  # K1 = 3 before step 5, K2 = 1 from step 5
    assert i_steps(12, 2, 2, 0.5) == [0, 3, 6, 9]  # K2 = K1: one fixed interval
    assert i_steps(20, 4, 2, 0.25) == [0, 5, 8, 11, 14, 17]  # boundary at step 5
    assert i_steps(6, 0, 0, 0.5) == list(range(6))  # K = 0: every step independent
    assert i_steps(7, 3, 1, 1.0) == [0, 4]  # phase 1 for the whole run


def test_adaptive_blocks_prune_where_least_importance_is_lost():
    w = torch.full((4, 8), 0.1)
    w[0, :2] = 0.9  # block 0: importance concentrated on 2 tokens → keeping 2 loses little
    w[1] = 0.5  # block 1: important everywhere
    w[2, :4] = 0.9  # block 2: 4 important tokens
    w[3] = 0.05  # block 3: nothing important
    lost = torch.sort(w, dim=1, descending=True).values[:, 2:].sum(1)
    assert adaptive_blocks(w, 2, keep=2) == sorted(torch.argsort(lost)[:2].tolist()) == [0, 3]
    assert adaptive_blocks(w, 3, keep=4) == [0, 2, 3]  # block 2 loses nothing beyond its 4 tokens
    assert adaptive_blocks(w, 0, keep=2) == []


# ---------------------------------------------------------------------- equalities with full


def test_no_caching_settings_equal_full(tiny_dit, tiny_mdt, tmp_path):
    for model in (tiny_dit, tiny_mdt):
        want, _ = run(model, "full", "ddim10", range(3))
        path, _ = predictor_file(tmp_path, model, "ddim10", 10)
        for params in (dict(cache_ratio=0.0), dict(k1=0, k2=0), dict(block_ratio=0.0),
                       dict(cache_ratio=0.0, token_choice="attention", block_selection="uniform")):
            got, engine = run(model, get_method("tokencache", predictor=path, **params), "ddim10", range(3))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=str(params))
            assert (engine.counts == N_TOKENS).all(), params


def test_exactly_k_tokens_in_the_selected_blocks(tiny_dit, tmp_path):
    path, w = predictor_file(tmp_path, tiny_dit, "ddim12", 12)
    method = get_method("tokencache", predictor=path, cache_ratio=0.75, block_ratio=0.5, k1=3, k2=2,
                        phase_boundary=0.5)
    _, engine = run(tiny_dit, method, "ddim12", range(2))
    counts = engine.counts
    full = tprr_schedule(12, 3, 2, 0.5)
    keep = N_TOKENS - 12  # k = N − round(ρN) = 4
    for step in range(12):
        if full[step]:
            assert (counts[step] == N_TOKENS).all()
            continue
        pruned = adaptive_blocks(w[step], 2, keep)
        for block in range(BLOCKS):
            want = keep if block in pruned else N_TOKENS
            assert (counts[step, block] == want).all(), (step, block)
    assert engine.summary()["partial_fraction"] == pytest.approx(sum(not f for f in full) * 2 / (12 * BLOCKS))


def test_predictor_tokens_are_the_top_k(tiny_dit, tmp_path):
    """The recomputed tokens are the k largest w[t, l]: only they differ from the cached output."""
    path, w = predictor_file(tmp_path, tiny_dit, "ddim4", 4, seed=5)
    method = get_method("tokencache", predictor=path, cache_ratio=0.75, block_ratio=1.0, k1=3, k2=3)
    stored = {}
    with attach(tiny_dit, method, "ddim4") as engine:
        engine._observe = lambda step, block, branch, *, x, output, attention, rows: stored.__setitem__(
            (step, block, branch), output.clone())
        gens = sample_generators(0, [0])
        generate(tiny_dit, engine.sampler, draw_labels(gens, 10), gens, step_listener=engine.step_listener)
    for block in range(BLOCKS):
        top = set(torch.argsort(w[1, block], descending=True, stable=True)[:4].tolist())
        changed = (stored[1, block, "attn"] != stored[0, block, "attn"]).any(dim=-1)[0]
        assert 0 < changed.sum() and set(torch.nonzero(changed).flatten().tolist()) <= top


def test_uniform_and_random_and_attention_variants(tiny_dit, tmp_path):
    path, _ = predictor_file(tmp_path, tiny_dit, "ddim9", 9)
    _, uniform = run(tiny_dit, get_method("tokencache", cache_ratio=0.5, block_ratio=0.5, block_selection="uniform",
                                          token_choice="random", k1=2, k2=2), "ddim9", range(2))
    p_steps = [s for s, f in enumerate(tprr_schedule(9, 2, 2, 0.5)) if not f]
    assert (uniform.counts[p_steps] == N_TOKENS - 4).all()  # every block: N − round(ρβN)
    a, _ = run(tiny_dit, get_method("tokencache", predictor=path, token_choice="random", seed=1), "ddim9", range(2))
    b, _ = run(tiny_dit, get_method("tokencache", predictor=path, token_choice="random", seed=1), "ddim9", range(2))
    c, _ = run(tiny_dit, get_method("tokencache", predictor=path, token_choice="random", seed=2), "ddim9", range(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    _, attention = run(tiny_dit, get_method("tokencache", predictor=path, token_choice="attention"), "ddim9", range(2))
    overhead = attention.summary()["overhead"]
    assert overhead["attention_scores"]["total"] > 0 and overhead["token_scores"]["total"] > 0
    with pytest.raises(ValueError, match="set predictor=PATH"):
        run(tiny_dit, get_method("tokencache"), "ddim9", [0])
    with pytest.raises(ValueError, match="must not exceed"):
        run(tiny_dit, get_method("tokencache", predictor=path, k1=1, k2=2), "ddim9", [0])


# ---------------------------------------------------------------------- predictor file and training


def test_predictor_file_is_tied_to_model_and_sampler(tiny_dit, tmp_path):
    path, _ = predictor_file(tmp_path, tiny_dit, "ddim8", 8)
    method = get_method("tokencache")
    assert importance(load_calibration(method, path)).shape == (8, BLOCKS, N_TOKENS)
    with pytest.raises(ValueError, match="made for sampler ddim8"):
        run(tiny_dit, get_method("tokencache", predictor=path), "ddim10", [0])
    other = randomize(create_model("DiT", **TINY), seed=1).eval()
    with pytest.raises(ValueError, match="other weights"):
        run(other, get_method("tokencache", predictor=path), "ddim8", [0])
    deeper = randomize(create_model("DiT", **dict(TINY, depth=5))).eval()
    with pytest.raises(ValueError, match="made for model"):
        load_calibration(method, path, deeper)


def test_relaxation_endpoints(tiny_dit):
    """w = 1 gives the full model's output, w = 0 the output of reusing every cached branch."""
    gens = sample_generators(0, range(2))
    x0 = torch.stack([torch.randn(1, 8, 8, generator=g) for g in gens])
    x1 = x0 * 0.9
    y = torch.tensor([1, 2])
    t0, t1 = torch.tensor([600, 600]), torch.tensor([500, 500])
    method = _TokenRelaxation()
    engine = CacheEngine(tiny_dit, method, "ddim4").attach()
    try:
        with torch.no_grad():
            method.relaxed_step = 1
            engine.begin_step(0)
            tiny_dit(x0, t0, y)
            engine.begin_step(1)
            method.weights = torch.ones(BLOCKS, N_TOKENS)
            ones = tiny_dit(x1, t1, y)
            method.weights = None
            zeros = tiny_dit(x1, t1, y)
    finally:
        engine.detach()
    with attach(tiny_dit, get_method("fora", interval=2), "ddim5") as fora:  # step 1 (i = 3) reuses
        with torch.no_grad():
            fora.begin_step(0)
            tiny_dit(x0, t0, y)
            fora.begin_step(1)
            reused = tiny_dit(x1, t1, y)
    with torch.no_grad():
        torch.testing.assert_close(ones, tiny_dit(x1, t1, y), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(zeros, reused, rtol=1e-6, atol=1e-6)


def test_training_lowers_the_loss_and_writes_a_matching_file(tiny_dit, tmp_path):
    out = tmp_path / "predictor.pt"
    weights = {k: v.clone() for k, v in tiny_dit.state_dict().items()}
    method = get_method("tokencache")
    settings = method.calibration(steps=40, batch_size=2, num_samples=4, lr=0.2, sparsity=0.1, seed=7)
    summary = calibrate(method, tiny_dit, "ddim4", settings, SamplingSettings(cfg_scale=2.0), out=out)
    assert summary["final_loss"] < 0.8 * summary["first_loss"]
    assert all(torch.equal(v, tiny_dit.state_dict()[k]) for k, v in weights.items())  # the backbone is frozen
    assert tiny_dit.cache_context is None
    logits = load_calibration(method, out, tiny_dit, "ddim4")["logits"]
    assert logits.shape == (4, BLOCKS, N_TOKENS) and read_calibration_file(out)["settings"]["sparsity"] == 0.1
    assert torch.equal(logits[0], torch.zeros(BLOCKS, N_TOKENS))  # step 0 has no previous step: untouched
    again = calibrate(method, tiny_dit, "ddim4", settings, SamplingSettings(cfg_scale=2.0))
    assert again["final_loss"] == summary["final_loss"]  # deterministic given the seed
    _, engine = run(tiny_dit, get_method("tokencache", predictor=str(out), k1=1, k2=1), "ddim4", [0])
    assert engine.summary()["steps_run"] == 4


# ---------------------------------------------------------------------- v2: the input-dependent predictor


def test_percentile_steps_follow_the_cumulative_mass():
    from tokencache.baselines._tokencache_v2 import percentile_steps

    flat = percentile_steps(torch.ones(12), 4)
    assert [s for s, f in enumerate(flat) if f] == [0, 2, 5, 8]  # uniform mass: evenly spread
    early = percentile_steps(torch.tensor([8.0, 4, 2, 1, 1, 1, 1, 1, 1, 1]), 4)
    assert sum(early) == 4 and [s for s, f in enumerate(early) if f] == [0, 1, 2, 4]  # denser where the mass is
    assert sum(percentile_steps(torch.zeros(5), 3)) == 3 and percentile_steps(torch.ones(3), 9) == [True] * 3


def test_block_budget_splits_one_global_ratio_by_the_scores():
    from tokencache.baselines._tokencache_v2 import block_budget

    mean_alpha = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.1, 0.2, 0.3, 0.4], [0.5, 0.05, 0.05, 0.05]])
    assert block_budget(mean_alpha, 0.5) == [4, 1, 1]  # the 6 largest of 12: all of block 0, 0.4, 0.5
    assert block_budget(mean_alpha, 0.0) == [4, 4, 4] and block_budget(mean_alpha, 1.0) == [0, 0, 0]


def test_v2_trains_an_input_dependent_predictor_and_uses_each_samples_scores(tiny_dit, tmp_path):
    from tokencache.baselines._tokencache_v2 import load_predictor_network

    method = get_method("tokencache", version=2)
    out = tmp_path / "v2.pt"
    settings = method.calibration(steps=30, batch_size=2, num_samples=4, sparsity=0.2, seed=5)
    summary = calibrate(method, tiny_dit, "ddim6", settings, SamplingSettings(cfg_scale=2.0), out=out)
    assert summary["variant"] == "tokencache-v2" and summary["final_loss"] < summary["first_loss"]
    tensors = load_calibration(method, out, tiny_dit, "ddim6")
    assert tensors["mean_alpha"].shape == (6, BLOCKS, N_TOKENS)
    with pytest.raises(ValueError, match="made for tokencache-v2, this run needs tokencache"):
        run(tiny_dit, get_method("tokencache", predictor=str(out)), "ddim6", [0])
    network = load_predictor_network(tiny_dit, tensors)
    scores = {}
    v2 = get_method("tokencache", version=2, predictor=str(out))
    decide = v2.block_action

    def spy(step, block, inputs):
        if block == 0 and not v2.plan.full[step]:
            scores[step] = network(inputs.x, inputs.c)
        return decide(step, block, inputs)

    v2.block_action = spy
    chosen = {}
    branch_action = v2.branch_action

    def spy_branch(step, block, branch):
        action = branch_action(step, block, branch)
        if type(action).__name__ == "Subset":
            chosen[step, block] = action.tokens
        return action

    v2.branch_action = spy_branch
    _, engine = run(tiny_dit, v2, "ddim6", range(3))
    assert chosen and scores
    for (step, block), tokens in chosen.items():
        k = tokens.shape[1]
        want = torch.argsort(scores[step][:, block], dim=1, descending=True, stable=True)[:, :k]
        assert torch.equal(tokens, want)  # every sample (and CFG row) its own top-k
    assert len({tuple(t[0].tolist()) for t in chosen.values()}) > 1
    resolved = engine.summary()["resolved"]
    assert resolved["i_steps"] == "predictor" and resolved["global_ratio"] == 0.375
    assert resolved["predictor_parameters"] > 0 and engine.summary()["overhead"]["predictor"]["total"] > 0
    with pytest.raises(ValueError, match="needs version=2"):
        get_method("tokencache", i_steps="predictor")
