"""The caching engine: attach/detach, exact reuse, subset scatter, spans, resets, counts, errors."""
import json
from dataclasses import dataclass, field

import pytest
import torch

from conftest import TINY, randomize
from tokencache.cache import (
    COMPUTE,
    REUSE,
    CacheEngine,
    CacheMethod,
    ComputeSpan,
    Forecast,
    Reuse,
    ReuseSpan,
    Span,
    Subset,
    attach,
    get_method,
    load_plugins,
)
from tokencache.models import create_model
from tokencache.sampling import draw_labels, generate, sample_generators



@pytest.fixture
def tiny_mdt_v1():
    return randomize(create_model("MDT", **TINY, decode_layer=2)).eval()


def sample(model, indices, sampler="ddim12", engine=None):
    gens = sample_generators(5, indices)
    labels = draw_labels(gens, 10)
    return generate(model, engine.sampler if engine else sampler, labels, gens, cfg_scale=2.0, clip_denoised=True,
                    step_listener=engine.step_listener if engine else None)


def inputs(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 8, 8, generator=g), torch.full((batch,), 400), torch.arange(batch) % 10


@dataclass
class ShuffledState:
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    rows: int = 0


@dataclass
class ShuffledSubset(CacheMethod):
    """Test method: step 0 computes; later steps recompute ALL tokens as a per-row random subset."""

    name = "test-shuffled-subset"
    State = ShuffledState

    def branch_action(self, step, block, branch):
        if step == 0:
            return COMPUTE
        order = [torch.randperm(self.info.num_tokens, generator=self.state.generator) for _ in range(self.state.rows)]
        return Subset(torch.stack(order))

    def observe(self, step, block, branch, *, x, output, attention, rows):
        self.state.rows = x.shape[0]


@dataclass
class ReuseFirst(CacheMethod):
    """Test method with a bug: it reuses before anything was stored."""

    name = "test-reuse-first"

    def branch_action(self, step, block, branch):
        return REUSE


@dataclass
class SpanThenReuse(CacheMethod):
    """Test method: span [1, 2] computed on even steps, reused on odd steps; branches always computed."""

    name = "test-span"

    def block_action(self, step, block, inputs):
        if block == 1:
            return ComputeSpan(1, 2) if step % 2 == 0 else ReuseSpan(1, 2)
        return None


# ---------------------------------------------------------------------- attach / detach


def test_attach_sets_and_removes_the_context(tiny_dit):
    assert tiny_dit.cache_context is None
    with attach(tiny_dit, "fora", "ddim12") as engine:
        assert tiny_dit.cache_context is engine
    assert tiny_dit.cache_context is None
    with pytest.raises(KeyError):
        with attach(tiny_dit, get_method("fora"), "ddim12"):
            raise KeyError("boom")
    assert tiny_dit.cache_context is None
    with attach(tiny_dit, "full", "ddim12") as engine:  # passthrough: the model stays untouched
        assert tiny_dit.cache_context is None
        sample(tiny_dit, [0], engine=engine)
    assert engine.summary()["token_fraction"] == 1.0 and engine.summary()["full_steps"] == 12


def test_a_second_engine_cannot_attach(tiny_dit):
    with attach(tiny_dit, "fora", "ddim12"):
        with pytest.raises(RuntimeError, match="already has a cache context"):
            with attach(tiny_dit, "fora", "ddim12"):
                pass
    assert tiny_dit.cache_context is None


def test_errors_are_clear(tiny_dit):
    with attach(tiny_dit, ReuseFirst(), "ddim12") as engine:
        with pytest.raises(RuntimeError, match="nothing is stored"):
            sample(tiny_dit, [0], engine=engine)
    with attach(tiny_dit, "fora", "ddim12"):
        with pytest.raises(RuntimeError, match="step_listener"):
            tiny_dit(*inputs())
    with attach(tiny_dit, "fora", "ddim12") as engine:
        with pytest.raises(ValueError, match="attached for 12 steps"):
            generate(tiny_dit, "ddim10", torch.tensor([1]), sample_generators(0, [0]), step_listener=engine.step_listener)


# ---------------------------------------------------------------------- exactness


@pytest.mark.parametrize("family", ["dit", "mdtv2", "mdtv1"])
def test_subset_of_all_tokens_in_random_order_equals_full(family, tiny_dit, tiny_mdt, tiny_mdt_v1):
    model = {"dit": tiny_dit, "mdtv2": tiny_mdt, "mdtv1": tiny_mdt_v1}[family]
    want = sample(model, range(3))
    with attach(model, ShuffledSubset(), "ddim12") as engine:
        got = sample(model, range(3), engine=engine)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (engine.counts == model.num_tokens).all()
    assert engine.summary()["partial_fraction"] == 0.0


def test_reuse_at_the_same_input_reproduces_the_computation(tiny_dit, tiny_mdt):
    """Stored pre-gate outputs, scattered subsets and span residuals give back what was computed."""
    x, t, y = inputs()
    for model in (tiny_dit, tiny_mdt):
        want = model(x, t, y)
        deepcache = get_method("deepcache", interval=2, shallow_blocks=1 if model is tiny_dit else 0)
        for method in (get_method("fora", interval=2), SpanThenReuse(), deepcache):
            engine = CacheEngine(model, method, "ddim13").attach()  # fora: step 1 (i = 11) reuses
            try:
                engine.begin_step(0)
                first = model(x, t, y)
                engine.begin_step(1)
                again = model(x, t, y)
            finally:
                engine.detach()
            torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-5)
            assert (engine.counts[1] < model.num_tokens).any()


def test_subset_scatters_into_the_stored_output():
    class Fake(torch.nn.Module):
        block_count, num_tokens = 1, 4
        x_embedder = type("E", (), {"grid_size": 2})()

    tokens = torch.tensor([[2, 0], [3, 1]])

    @dataclass
    class Plan(CacheMethod):
        name = "test-plan"

        def branch_action(self, step, block, branch):
            return COMPUTE if step == 0 else Subset(tokens)

    def branch(h, tokens=None):
        out = 2 * h + 1
        return out if tokens is None else torch.gather(out, 1, tokens.unsqueeze(-1).expand(-1, -1, h.shape[-1]))

    engine = CacheEngine(Fake(), Plan(), "ddim4")
    x0, x1 = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    engine.begin_step(0)
    engine.branch(0, "mlp", branch, x0)
    engine.begin_step(1)
    out = engine.branch(0, "mlp", branch, x1)
    want = 2 * x0 + 1
    for row in range(2):
        want[row, tokens[row]] = 2 * x1[row, tokens[row]] + 1
    torch.testing.assert_close(out, want)
    assert engine.counts[:2, 0, 1].tolist() == [4, 2]


# ---------------------------------------------------------------------- state and counts


def test_state_resets_between_generations_and_batch_sizes_may_change(tiny_dit):
    with attach(tiny_dit, "fora", "ddim12") as engine:
        first = sample(tiny_dit, range(3), engine=engine)
        counts = engine.counts
        bigger = sample(tiny_dit, range(5), engine=engine)
        assert engine.summary()["rows"] == 10
        again = sample(tiny_dit, range(3), engine=engine)
    assert torch.equal(first, again)
    assert (engine.counts == counts).all()
    torch.testing.assert_close(bigger[:3], first, rtol=1e-5, atol=1e-5)
    engine.reset()
    assert engine.counts.sum() == 0 and engine.step == -1


def test_span_counts_and_summary(tiny_dit):
    with attach(tiny_dit, SpanThenReuse(), "ddim12") as engine:
        out = sample(tiny_dit, range(2), engine=engine)
    assert torch.isfinite(out).all()
    n = tiny_dit.num_tokens
    counts = engine.counts
    assert (counts[0::2] == n).all()
    assert (counts[1::2, 1:3] == 0).all() and (counts[1::2, [0, 3]] == n).all()
    blocks_run = engine.blocks_run
    assert (blocks_run[1::2, 1:3] == 0).all() and blocks_run.sum() == 12 * 4 - 6 * 2
    summary = json.loads(json.dumps(engine.summary()))
    assert summary["skipped_fraction"] == pytest.approx(0.25)
    assert summary["token_fraction"] == pytest.approx(0.75)
    assert summary["full_steps"] == 6
    assert summary["per_step"]["cached"][:2] == [0.0, 0.5]
    # each step stores (even) or adds (odd) one residual of n tokens per row
    assert summary["overhead"]["span_residual_tokens"]["per_step"] == [n] * 12
    assert summary["method"] == "test-span" and summary["sampler"] == "ddim12"


# ---------------------------------------------------------------------- forecasts, per-row decisions, inputs, state


@dataclass
class DoubleForecast(CacheMethod):
    """Test method: step 0 computes; later steps forecast twice the stored output on even steps, reuse on odd."""

    name = "test-forecast"

    def branch_action(self, step, block, branch):
        if step == 0:
            return COMPUTE
        if step % 2 == 0:
            return Forecast(2 * self.stored[block, branch])
        return REUSE

    def observe(self, step, block, branch, *, x, output, attention, rows):
        self.stored[block, branch] = output.clone()

    def setup(self, info):
        super().setup(info)
        self.stored = {}


def test_a_forecast_is_stored_used_and_counted_as_no_tokens(tiny_dit):
    x, t, y = inputs()
    method = DoubleForecast()
    engine = CacheEngine(tiny_dit, method, "ddim6").attach()
    seen = {}
    handles = [b.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o.detach().clone()))
               for i, b in enumerate(tiny_dit.blocks)]
    try:
        engine.clone_stored = True
        engine.begin_step(0)
        tiny_dit(x, t, y)
        engine.begin_step(2)  # forecast 2 × stored
        forecast_out = tiny_dit(x, t, y)
        stored = {k: v.clone() for k, v in engine._outputs.items()}
        engine.begin_step(3)  # reuse: returns the stored forecast
        reused_out = tiny_dit(x, t, y)
    finally:
        engine.detach()
        for h in handles:
            h.remove()
    for (block, branch), value in stored.items():
        torch.testing.assert_close(value, 2 * method.stored[block, "attn" if branch == 0 else "mlp"])
    assert (engine.counts[2] == 0).all() and (engine.counts[3] == 0).all() and (engine.counts[0] == 16).all()
    torch.testing.assert_close(forecast_out, reused_out)  # same gates (same t): the reuse returned the forecast


def test_a_forecast_of_the_wrong_shape_is_refused(tiny_dit):
    @dataclass
    class Bad(CacheMethod):
        name = "test-bad-forecast"

        def branch_action(self, step, block, branch):
            return Forecast(torch.zeros(1, 2, 3))

    with attach(tiny_dit, Bad(), "ddim4") as engine:
        with pytest.raises(RuntimeError, match="forecast of the attn output of block 0 has shape"):
            sample(tiny_dit, [0], engine=engine)


@pytest.mark.slow
@pytest.mark.parametrize("host_sync", [True, False])
def test_per_row_spans_are_exact_per_sample(tiny_dit, tiny_mdt, host_sync, monkeypatch):
    """Rows decide apart: at any batch size each sample's result is its own; with host_sync only the
    rows that compute run the span (counted per row), without it every row runs and counts."""
    from conftest import readme_examples

    load_plugins(readme_examples()[0])
    cls = type(get_method("residual-skip"))
    monkeypatch.setattr(cls, "host_sync", host_sync)
    for model in (tiny_dit, tiny_mdt):
        outs, engines = [], []
        for batch in (1, 4, 6):
            images = []
            with attach(model, get_method("residual-skip", threshold=1.0), "ddim40") as engine:
                for lo in range(0, 6, batch):
                    images.append(sample(model, range(lo, min(lo + batch, 6)), engine=engine))
            outs.append(torch.cat(images))
            engines.append(engine)
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
        summary = engines[2].summary()
        ran = engines[2].record.block_sums[:, 1:]
        if host_sync:
            assert summary["host_syncs"] > 0
            assert 0 < summary["blocks_run_fraction"] < 1
            assert ((ran > 0) & (ran < 12)).any()  # some steps with rows that ran and rows that skipped
        else:
            assert summary["host_syncs"] == 0 and summary["blocks_run_fraction"] == 1.0


@dataclass
class EvenRowsReuse(CacheMethod):
    """Test method: on odd steps even rows reuse their MLP output, odd rows compute it."""

    name = "test-even-rows"

    def branch_action(self, step, block, branch):
        if step % 2 == 0 or branch == "attn":
            return COMPUTE
        rows = self.info.model.cache_context._batch
        return Reuse(rows=torch.arange(rows) % 2 == 0)


@pytest.mark.parametrize("host_sync", [True, False])
def test_per_row_branch_reuse(tiny_dit, host_sync, monkeypatch):
    monkeypatch.setattr(EvenRowsReuse, "host_sync", host_sync)
    x, t, y = inputs(batch=4)

    def two_steps(method):
        engine = CacheEngine(tiny_dit, method, "ddim4").attach()
        try:
            engine.begin_step(0)
            tiny_dit(x, t, y)
            engine.begin_step(1)
            return tiny_dit(x * 0.5, t, y), engine
        finally:
            engine.detach()

    got, engine = two_steps(EvenRowsReuse())
    reuse_all, _ = two_steps(get_method("fora", interval=5))  # ddim4: step 1 (i = 2) reuses every branch
    attn_fresh = tiny_dit(x * 0.5, t, y)
    torch.testing.assert_close(got[1::2], attn_fresh[1::2])  # odd rows computed everything
    assert not torch.allclose(got[0::2], attn_fresh[0::2])  # even rows reused their MLP
    want_mlp = 16 * 2 / 4 if host_sync else 16
    assert (engine.counts[1, :, 1] == want_mlp).all() and (engine.counts[1, :, 0] == 16).all()
    assert reuse_all.shape == got.shape


def test_block_inputs_give_the_timestep_modulated_attention_input(tiny_dit, tiny_mdt):
    @dataclass
    class Probe(CacheMethod):
        name = "test-probe"

        def setup(self, info):
            super().setup(info)
            self.seen = {}

        def block_action(self, step, block, inputs):
            self.seen[block] = inputs.attention_input()
            return None

    for model in (tiny_dit, tiny_mdt):
        captured = {}
        blocks = list(model._all_blocks()) if hasattr(model, "_all_blocks") else list(model.blocks)
        handles = [b.attn.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a[0].clone()))
                   for i, b in enumerate(blocks)]
        method = Probe()
        try:
            with attach(model, method, "ddim4") as engine:
                engine.begin_step(0)
                model(*inputs())
        finally:
            for h in handles:
                h.remove()
        for i in range(len(blocks)):
            torch.testing.assert_close(method.seen[i], captured[i])


def test_state_is_created_fresh_for_every_generation(tiny_dit):
    @dataclass
    class Counter:
        calls: int = 0

    states = []

    @dataclass
    class Counting(CacheMethod):
        name = "test-counting"
        State = Counter

        def begin_step(self, step):
            self.state.calls += 1
            if step == 0:
                states.append(self.state)

    with attach(tiny_dit, Counting(), "ddim5") as engine:
        sample(tiny_dit, [0], sampler="ddim5", engine=engine)
        sample(tiny_dit, [1, 2], sampler="ddim5", engine=engine)
    assert len(states) == 2 and states[0] is not states[1] and [s.calls for s in states] == [5, 5]


def test_a_span_must_start_where_it_is_returned(tiny_dit):
    @dataclass
    class Late(CacheMethod):
        name = "test-late-span"

        def block_action(self, step, block, inputs):
            return ComputeSpan(0, 2) if block == 1 else None

    with attach(tiny_dit, Late(), "ddim4") as engine:
        with pytest.raises(TypeError, match="expected None or a Span starting at block 1"):
            sample(tiny_dit, [0], sampler="ddim4", engine=engine)


def test_a_kept_output_replaces_the_span_whatever_its_input(tiny_dit, tiny_mdt):
    """``keep="output"``: the stored output of the span's last block, shared by spans ending there."""
    @dataclass
    class Replace(CacheMethod):
        name = "test-replace"

        def block_action(self, step, block, inputs):
            if step == 0 and block == 1:
                return Span(1, self.info.block_count - 1, keep="output")
            if step == 1 and block == 0:
                return Span(0, self.info.block_count - 1, reuse=True, keep="output")
            return None

    for model in (tiny_dit, tiny_mdt):
        x, t, y = inputs()
        last = {}
        blocks = list(model._all_blocks()) if hasattr(model, "_all_blocks") else list(model.blocks)
        handle = blocks[-1].register_forward_hook(lambda m, a, o: last.__setitem__("out", o.detach().clone()))
        engine = CacheEngine(model, Replace(), "ddim4").attach()
        try:
            engine.begin_step(0)
            model(x, t, y)
            engine.begin_step(1)
            got = model(x * 0.3, t * 0 + 100, y)
        finally:
            engine.detach()
            handle.remove()
        torch.testing.assert_close(engine._residuals[("output", len(blocks) - 1)], last["out"])
        assert engine.blocks_run[1].sum() == 0 and (engine.counts[1] == 0).all()
        assert got.shape == (3, model.out_channels, 8, 8)
