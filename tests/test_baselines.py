"""The baseline methods: no-op settings equal `full`, schedules and counts, batch independence, L2C."""
import math

import pytest
import torch

from conftest import TINY, randomize
from tokencache.cache import attach, get_method, load_router, save_router, train_router
from tokencache.models import create_model
from tokencache.sampling import draw_labels, generate, sample_generators

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
    path = tmp_path / name
    save_router(path, logits, model, sampler)
    return str(path)


def random_logits(model, steps, seed=0):
    return torch.randn(steps, model.block_count, 2, generator=torch.Generator().manual_seed(seed)) * 3


# ---------------------------------------------------------------------- no-op settings


NOOP = {
    "fora": dict(interval=1),
    "toca-all-fresh": dict(schedule="constant", fresh_ratio=1.0, module_weight=0.0),
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
    assert full == list(range(0, 50, 3)) and len(full) == 17
    assert (counts[[k for k in range(50) if k not in full]] == 0).all()
    summary = engine.summary()
    assert summary["full_steps"] == 17 and summary["skipped_fraction"] == pytest.approx(33 / 50)
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


def official_toca_plan(num_steps, blocks, loop, fresh_ratio=0.07):
    """ToCa's rules written out independently: (full steps, mlp tokens per step and block)."""
    interval = 4 if loop == "ddpm" else 3
    step_w, layer_w = (0.4, 0.8) if loop == "ddpm" else (2.0, -0.2)
    full, tokens, threshold = [], {}, interval
    for k in range(num_steps):
        s = num_steps - 1 - k  # the official step counts down
        if k == 0 or s % threshold == 0:
            full.append(k)
            threshold = round(interval / (1 + 0.4 - 0.8 * s / num_steps))
            if int(0.2 * num_steps) <= s < int(0.4 * num_steps):
                threshold = 2
            continue
        for layer in range(blocks):
            ratio = (fresh_ratio * (1 + layer_w - 2 * layer_w * layer / (blocks - 1))
                     * (1 + step_w - 2 * step_w * s / num_steps) * 2.5)
            tokens[k, layer] = math.floor(min(max(ratio, 0.0), 1.0) * N_TOKENS)
    return full, tokens


def test_toca_schedule_and_fresh_token_counts(tiny_dit):
    import sys

    _, engine = run(tiny_dit, get_method("toca"), "ddim50", range(2))
    full, tokens = official_toca_plan(50, 4, "ddim")
    assert [49 - k for k in full] == [49, 45, 44, 40, 36, 32, 30, 27, 24, 21, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0]
    counts = engine.counts
    assert [k for k in range(50) if (counts[k] == N_TOKENS).all()] == full
    for (k, layer), k_mlp in tokens.items():
        assert counts[k, layer, 0] == 0, (k, layer)  # attention fully reused on ToCa steps
        assert counts[k, layer, 1] == k_mlp, (k, layer)
    assert 0 < engine.summary()["partial_fraction"] < 1
    overhead = engine.summary()["overhead"]
    partial = sum(0 < v < N_TOKENS for v in tokens.values())
    assert overhead["token_scores"]["total"] == partial * N_TOKENS
    assert overhead["explicit_attention"]["total"] == len(full) * 4
    # DDPM-250 rules, checked on the plan alone (no model run)
    toca = sys.modules[type(get_method("toca")).__module__]
    full_ddpm, tokens_ddpm = official_toca_plan(250, 28, "ddpm")
    plan = toca.full_step_schedule(250, 4, 0.07, 0.4, 2)
    assert [k for k in range(250) if plan[k]] == full_ddpm
    for (k, layer), want in tokens_ddpm.items():
        assert toca.fresh_tokens("ToCa-ddpm250", 0.07, 249 - k, 250, layer, 28, "mlp", 2.5, N_TOKENS) == want


def test_toca_picks_the_best_token_of_each_cell():
    import sys

    toca = sys.modules[type(get_method("toca")).__module__]
    score = torch.arange(16.0).view(1, 16)  # 4×4 grid: cell maxima at 5, 7, 13, 15
    out = toca.spatial_bonus(score, 0.6, 4)
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
    with pytest.raises(ValueError, match="trained for sampler ddim20"):
        run(tiny_dit, get_method("l2c", router=path), "ddim10", [0])
    other = randomize(create_model("DiT", **TINY), seed=1).eval()
    with pytest.raises(ValueError, match="other weights"):
        run(other, get_method("l2c", router=path), "ddim20", [0])
    deeper = randomize(create_model("DiT", **dict(TINY, depth=5))).eval()
    with pytest.raises(ValueError, match="trained for model"):
        load_router(path, deeper)
    with pytest.raises(ValueError, match="does not exist"):
        run(tiny_dit, get_method("l2c", router=str(tmp_path / "missing.pt")), "ddim20", [0])


def test_train_router_learns_only_routed_steps(tiny_dit, tmp_path):
    out = tmp_path / "trained.pt"
    flags = [p.requires_grad for p in tiny_dit.parameters()]
    weights = {k: v.clone() for k, v in tiny_dit.state_dict().items()}
    summary = train_router(tiny_dit, "ddim6", cfg_scale=2.0, steps=4, batch_size=2, num_samples=3, lr=0.1, l1=1e-3,
                           seed=11, out=out)
    assert summary["router"] == str(out) and summary["routed_modules"] == 3 * 4 * 2
    assert [p.requires_grad for p in tiny_dit.parameters()] == flags and tiny_dit.cache_context is None
    assert all(torch.equal(v, tiny_dit.state_dict()[k]) for k, v in weights.items())  # the backbone is frozen
    logits = load_router(out, tiny_dit, "ddim6")["logits"]
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
    assert method.sampler_override("ddim50-int") == "ddim25-int"
    assert method.sampler_override("ddpm250") == "ddpm25"
    with pytest.raises(ValueError, match="exceeds"):
        method.sampler_override("ddim20")


# ---------------------------------------------------------------------- batch independence


def defaults(name, model, tmp_path):
    if name == "l2c":
        return dict(router=router_file(tmp_path, model, "ddim20", random_logits(model, 20), f"{id(model)}.pt"))
    if name == "steps":
        return dict(num_steps=10)
    if name == "deepcache" and type(model).__name__ == "MDTv2":
        return dict(shallow_blocks=0)
    return {}


@pytest.mark.parametrize("name", ["full", "steps", "fora", "toca", "deepcache", "l2c"])
def test_a_sample_does_not_depend_on_its_batch(name, tiny_dit, tiny_mdt, tmp_path):
    for model in (tiny_dit, tiny_mdt):
        params = defaults(name, model, tmp_path)
        together, engine = run(model, get_method(name, **params), "ddim20", range(7))
        alone = torch.cat([run(model, get_method(name, **params), "ddim20", [i])[0] for i in range(7)])
        shifted, _ = run(model, get_method(name, **params), "ddim20", range(4, 7))
        assert torch.isfinite(together).all()
        torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(together[4:], shifted, rtol=1e-4, atol=1e-4)
        if name not in ("full", "steps"):
            assert engine.summary()["skipped_fraction"] > 0
