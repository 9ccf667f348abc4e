"""ClusCa and SpeCa against independent transcriptions of their official DiT code (official_rules.py).

ClusCa: the schedule on several samplers; end to end on a random tiny DiT with draws fed through
the method's ``draw`` (as recorded from the official code, each row its own), every K-means
(per row: the official rule on a batch of one row), every token chosen, every forecast and every
refreshed factor equal to the transcription (``torch.equal``). SpeCa: the decisions and
verifications per sample against ``speca_decisions`` fed with the errors the engine measured,
those errors against ``speca_error`` on the engine's forecast and shadow outputs, and the
forecasts against ``speca_taylor`` of the outputs computed on full steps.
"""
import sys

import pytest
import torch

from conftest import TINY
from official_rules import (_taylor_terms, clusca_full_refresh, clusca_kmeans, clusca_refresh_mlp, clusca_schedule,
                            clusca_select_tokens)
from tokencache.cache import Forecast, Subset, attach, get_method
from tokencache.sampling import draw_labels, generate, parse_sampler, sample_generators

N_TOKENS = 16
BLOCKS = TINY["depth"]


def run(model, method, sampler, indices=range(2), seed=3, batch=None):
    outs = []
    indices = list(indices)
    batch = batch or len(indices)
    with attach(model, method, sampler) as engine:
        for lo in range(0, len(indices), batch):
            gens = sample_generators(seed, indices[lo:lo + batch])
            outs.append(generate(model, engine.sampler, draw_labels(gens, 10), gens, cfg_scale=2.0,
                                 clip_denoised=True, step_listener=engine.step_listener))
    return torch.cat(outs), engine


def module(name):
    return sys.modules[type(get_method(name)).__module__]


# ---------------------------------------------------------------------------------------- ClusCa


@pytest.mark.parametrize("sampler", ["ddim50", "ddpm250", "ddim7"])
@pytest.mark.parametrize("interval", [4, 3])
def test_clusca_schedule_matches_the_official(tiny_dit, sampler, interval):
    steps = parse_sampler(sampler).steps
    types = clusca_schedule(steps, interval)
    assert [("full" if f else "ClusCa") for f in module("clusca").full_steps(steps, interval)] == types
    if steps > 20:
        return
    _, engine = run(tiny_dit, get_method("clusca", interval=interval, clusters=4), sampler, [0])
    counts = engine.counts
    for k, kind in enumerate(types):
        if kind == "full":
            assert (counts[k] == N_TOKENS).all()
        else:  # attention forecast, the MLP on one token per cluster
            assert (counts[k, :, 0] == 0).all() and (counts[k, :, 1] == 4).all()


def test_clusca_defaults_are_sample_py():
    method = get_method("clusca")
    assert (method.interval, method.max_order, method.clusters, method.propagation_ratio,
            method.tokens_per_cluster) == (4, 4, 16, 0.0, 1)
    assert (method.kmeans_iterations, method.kmeans_rtol, method.first_enhance) == (100, 1e-4, 2)


class ClusCaSpy:
    """Wraps a ClusCa instance: feeds recorded draws and records what the engine computed."""

    def __init__(self, method, seed=11):
        self.method = method
        self.g = torch.Generator().manual_seed(seed)
        self.draws = []  # (step, kind, tensor)
        self.block_out = {}  # step → block L−1's output on full steps
        self.outputs = {}  # (step, block, branch) → computed output on full steps
        self.forecasts = {}  # (step, block, branch) → output handed to the engine on ClusCa steps
        self.tokens = {}  # (step, block) → Subset tokens
        self.fresh = {}  # (step, block) → the recomputed MLP tokens
        self.kmeans = {}  # step → (labels, centroids) after the full step
        self.step = None
        observe, observe_block, decide = method.observe, method.observe_block, method.branch_action

        def draw(kind, size, rows):
            batch = method.state.factors[(0, "attn")][0].shape[0]
            if kind == "init":
                value = torch.randint(0, method.info.num_tokens, (batch, size), generator=self.g)
            else:
                value = torch.rand((batch, size), generator=self.g)
            self.draws.append((self.step, kind, value))
            return value

        def spy_observe(step, block, branch, **kw):
            self.outputs[(int(step), block, branch)] = kw["output"].clone()
            observe(step, block, branch, **kw)

        def spy_observe_block(step, block, output):
            self.step = int(step)
            if block == method.info.block_count - 1 and method.plan.full[step]:
                self.block_out[int(step)] = output.clone()
            observe_block(step, block, output)
            if int(step) in self.block_out and block == method.info.block_count - 1:
                self.kmeans[int(step)] = (method.state.labels.clone(), method.state.centroids.clone())

        def spy_decide(step, block, branch):
            self.step = int(step)
            action = decide(step, block, branch)
            if isinstance(action, Forecast):
                self.forecasts[(int(step), block, branch)] = action.output.clone()
            if isinstance(action, Subset):
                self.tokens[(int(step), block)] = action.tokens.clone()
                finish = action.finish

                def spy_finish(fresh):
                    self.fresh[(int(step), block)] = fresh.clone()
                    out = finish(fresh)
                    self.forecasts[(int(step), block, branch)] = out.clone()
                    return out
                return Subset(action.tokens, finish=spy_finish)
            return action

        method.draw, method.observe, method.observe_block, method.branch_action = (draw, spy_observe,
                                                                                    spy_observe_block, spy_decide)


@pytest.mark.parametrize("sampler, params", [
    ("ddim12", dict(interval=4, clusters=4)),
    ("ddpm9", dict(interval=3, clusters=5, max_order=2, propagation_ratio=0.5)),
    ("ddim10", dict(interval=4, clusters=3, propagation_ratio=0.005, tokens_per_cluster=2)),
])
def test_clusca_end_to_end_equals_the_transcription(tiny_dit, sampler, params):
    steps = parse_sampler(sampler).steps
    method = get_method("clusca", **params)
    spy = ClusCaSpy(method)
    run(tiny_dit, method, sampler, range(2))
    K, order, p, k_tok = method.clusters, method.max_order, method.propagation_ratio, method.tokens_per_cluster
    types = clusca_schedule(steps, method.interval)
    # K-means: per row, the official iterations on a batch of that row alone; warm start from the last
    draws = iter(spy.draws)
    init = next(d for d in draws)
    assert init[1] == "init" and init[0] == 0
    previous = None
    for k in (k for k, t in enumerate(types) if t == "full"):
        x = spy.block_out[k]
        labels, centroids = [], []
        for row in range(x.shape[0]):
            if previous is None:
                lab, cen, _ = clusca_kmeans(x[row:row + 1], K, init_idx=init[2][row:row + 1])
            else:
                lab, cen, _ = clusca_kmeans(x[row:row + 1], K, centroids=previous[row:row + 1])
            labels.append(lab)
            centroids.append(cen)
        previous = torch.cat(centroids)
        assert torch.equal(spy.kmeans[k][0], torch.cat(labels)), k
        assert torch.equal(spy.kmeans[k][1], previous), k
    # tokens, forecasts and factors, step by step, with the official factor arithmetic
    selects = [d for d in spy.draws if d[1] == "select"]
    assert len(selects) == sum(t == "ClusCa" for t in types) * BLOCKS
    selects = iter(selects)
    factors, activated, labels = {}, [49], None
    compared = 0
    for k, kind in enumerate(types):
        s = steps - 1 - k
        if kind == "full":
            activated.append(s)
            for block in range(BLOCKS):
                for branch in ("attn", "mlp"):
                    key = (block, branch)
                    factors[key] = clusca_full_refresh(factors.get(key, []), spy.outputs[(k, block, branch)],
                                                       activated[-1] - activated[-2], s, steps, order)
            labels = spy.kmeans[k][0]
            continue
        distance = s - activated[-1]
        for block in range(BLOCKS):
            want = _taylor_terms(factors[(block, "attn")], distance)
            assert torch.equal(spy.forecasts[(k, block, "attn")], want), (k, block)
            step_, _, weights = next(selects)
            assert step_ == k
            tokens = clusca_select_tokens(labels, K, weights)
            assert torch.equal(spy.tokens[(k, block)], tokens), (k, block)
            new, forecast = clusca_refresh_mlp(factors[(block, "mlp")], tokens, spy.fresh[(k, block)], labels, K,
                                               distance, p, k_tok)
            factors[(block, "mlp")] = new
            assert torch.equal(spy.forecasts[(k, block, "mlp")], forecast), (k, block)
            compared += 1
    assert compared > 0


def test_clusca_draws_come_from_each_samples_own_stream(tiny_dit):
    """Batch 1 and batch 3 byte-identical; the draws of a sample do not depend on the seeds of others."""
    alone, engine = run(tiny_dit, get_method("clusca", clusters=4), "ddim10", range(3), batch=1)
    together, _ = run(tiny_dit, get_method("clusca", clusters=4), "ddim10", range(3), batch=3)
    assert torch.equal(alone, together)
    assert engine.summary()["host_syncs"] > 0  # the K-means stopping test
    other, _ = run(tiny_dit, get_method("clusca", clusters=4), "ddim10", [0, 5, 6], batch=3)
    assert torch.equal(other[0], together[0])
    method = get_method("clusca", clusters=4)
    run(tiny_dit, method, "ddim10", [0])
    assert method.sample_seeds is not None and len(method.sample_seeds) == 1


def test_clusca_empty_cluster_keep_differs_only_in_the_centroid():
    kmeans = module("clusca").kmeans_rows
    x = torch.tensor([[0.0, 0.0, 5.0, 5.0]]).unsqueeze(-1)
    start = torch.tensor([[[0.0], [0.0], [5.0]]]) + torch.tensor([[[0.0], [3.0], [0.0]]])  # c1 = 3: no member
    start[0, 1, 0] = 9.0
    labels, centroids, work = kmeans(x, start, 3, 100, 1e-4, "official", lambda t: t.tolist())
    want_labels, want_centroids, iterations = clusca_kmeans(x, 3, centroids=start)
    assert torch.equal(labels, want_labels) and torch.equal(centroids, want_centroids) and work == iterations
    assert centroids[0, 1, 0] == 0.0  # the official zero centroid
    _, kept, _ = kmeans(x, start, 3, 100, 1e-4, "keep", lambda t: t.tolist())
    assert kept[0, 1, 0] == 9.0


def test_clusca_overhead_counts(tiny_dit):
    _, engine = run(tiny_dit, get_method("clusca", clusters=4), "ddim10", [0])
    summary = engine.summary()
    overhead = summary["overhead"]
    full = engine.method.plan.full
    kmeans = overhead["kmeans_values"]["per_step"]
    assert all((kmeans[k] > 0) == full[k] for k in range(10))
    # the mean over the 2 CFG rows of N·K·D per iteration each row ran
    assert all((2 * kmeans[k]) % (N_TOKENS * 4 * 32) == 0 for k in range(10))
    draws = overhead["token_draws"]["per_step"]
    assert all(draws[k] == (0 if full[k] else BLOCKS * N_TOKENS) for k in range(10))
    assert summary["overhead_prices"]["token_draws"] == 4


# ----------------------------------------------------------------------------------------- SpeCa

from official_rules import speca_decisions, speca_error, speca_taylor  # noqa: E402

#: a constant threshold between the tiny model's errors, so that samples disagree
MIXED = dict(base_threshold=1.2, decay_rate=1.0, min_threshold=0.0, max_taylor_steps=8)


class SpeCaSpy:
    def __init__(self, method):
        self.method = method
        self.outputs, self.forecasts, self.verified = {}, {}, {}
        observe, observe_block, decide = method.observe, method.observe_block, method.branch_action

        def spy_observe(step, block, branch, **kw):
            self.outputs[(int(step), block, branch)] = kw["output"].clone()
            observe(step, block, branch, **kw)

        def spy_observe_block(step, block, output):
            if method.state.shadow is not None:
                self.verified[int(step)] = (output.clone(), method.state.shadow.clone())
            observe_block(step, block, output)

        def spy_decide(step, block, branch):
            action = decide(step, block, branch)
            if isinstance(action, Forecast):
                self.forecasts[(int(step), block, branch)] = action.output.clone()
            return action

        method.observe, method.observe_block, method.branch_action = spy_observe, spy_observe_block, spy_decide


@pytest.mark.parametrize("sampler, params", [
    ("ddim50", {}),
    ("ddim30", MIXED),
    ("ddim30", dict(MIXED, error_metric="l1", base_threshold=4.5)),
    ("ddim20", dict(MIXED, error_metric="l2", base_threshold=6.0, min_taylor_steps=1, max_taylor_steps=3)),
    ("ddim20", dict(MIXED, error_metric="relative_l2", base_threshold=1.5, max_order=2)),
    ("ddpm12", dict(MIXED, taylor_after_full=False)),
])
def test_speca_end_to_end_equals_the_transcription(tiny_dit, sampler, params):
    """One sample (its two CFG rows): decisions, errors and forecasts as the official code computes them."""
    steps = parse_sampler(sampler).steps
    method = get_method("speca", **params)
    spy = SpeCaSpy(method)
    _, engine = run(tiny_dit, method, sampler, [1])
    history = method.state.history
    errors = {h["step"]: h["error"][0] for h in history if h["verify"][0]}
    if params.get("taylor_after_full") is False:  # the alternative (not official): the warm-up's 3 steps full
        assert [h["kinds"][0] for h in history][:4] == ["full", "full", "full", "Taylor"]
        return
    types, verified, thresholds = speca_decisions(
        steps, errors, method.base_threshold, method.decay_rate, method.min_taylor_steps, method.max_taylor_steps)
    # (the transcription's 0.01 floor is below the constant thresholds of the MIXED cases)
    assert [h["threshold"] for h in history] == [max(t, method.min_threshold) for t in thresholds]
    assert [h["kinds"][0] for h in history] == types
    assert [h["verify"][0] for h in history] == verified
    assert set(spy.verified) == {k for k, v in enumerate(verified) if v}
    for k, (forecast, full) in spy.verified.items():
        assert errors[k] == pytest.approx(speca_error(forecast, full, method.error_metric), rel=1e-5), k
    # counts: full steps every token, Taylor steps none; a verified step runs the last block in
    # shadow (recorded apart, priced as the overhead verification_tokens)
    counts, record = engine.counts, engine.record
    verification = engine.summary()["overhead"].get("verification_tokens", {"per_step": [0] * steps})["per_step"]
    for k, kind in enumerate(types):
        assert (counts[k] == (N_TOKENS if kind == "full" else 0)).all()
        assert (record.shadow_token_sums[k, -1] == (2 * N_TOKENS if verified[k] else 0)).all()
        assert (record.shadow_token_sums[k, :-1] == 0).all()
        assert verification[k] == (N_TOKENS if verified[k] else 0)
    # forecasts: the official Taylor factors (first_enhance 3, activated [T − 1]) of the computed outputs
    for block in range(BLOCKS):
        for branch in ("attn", "mlp"):
            _, official = speca_taylor(types, steps, method.max_order,
                                       features=lambda k: spy.outputs[(k, block, branch)])
            for k, value in official.items():
                assert torch.equal(spy.forecasts[(k, block, branch)], value), (k, block, branch)
    assert sum(t == "Taylor" for t in types) > 0


def test_speca_default_run_lengths_and_metrics():
    assert get_method("speca").error_metric == "relative_l1"
    for metric in ("cosine_similarity", "all"):  # crash in the official code: not offered
        with pytest.raises(ValueError):
            get_method("speca", error_metric=metric)
    # all errors small: full at k = 0, 2, 8, 14, …; all large: k = 0, 2, 6, 10, …
    small, _, _ = speca_decisions(50, lambda k: 0.0)
    large, _, _ = speca_decisions(50, lambda k: 1.0)
    assert [k for k, t in enumerate(small) if t == "full"][:4] == [0, 2, 8, 14]
    assert [k for k, t in enumerate(large) if t == "full"][:4] == [0, 2, 6, 10]


@pytest.mark.parametrize("params", [MIXED, dict(MIXED, error_metric="l1", base_threshold=4.5)])
def test_speca_samples_decide_alone(tiny_dit, params):
    """Each sample of a batch follows the schedule it follows alone; images byte-identical."""
    alone, histories = [], []
    for i in range(4):
        method = get_method("speca", **params)
        x, _ = run(tiny_dit, method, "ddim30", [i])
        alone.append(x)
        histories.append([h["kinds"][0] for h in method.state.history])
    method = get_method("speca", **params)
    together, engine = run(tiny_dit, method, "ddim30", range(4))
    assert torch.equal(torch.cat(alone), together)
    assert [[h["kinds"][i] for h in method.state.history] for i in range(4)] == histories
    assert len({tuple(h) for h in histories}) > 1  # the samples really disagree somewhere
    assert engine.summary()["host_syncs"] > 0
