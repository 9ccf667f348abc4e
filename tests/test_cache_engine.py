"""The caching engine: attach/detach, exact reuse, subset scatter, spans, resets, counts, errors."""
import json
from dataclasses import dataclass

import pytest
import torch

from conftest import TINY, randomize
from tokencache.cache import (
    COMPUTE,
    REUSE,
    CacheEngine,
    CacheMethod,
    ComputeSpan,
    ReuseSpan,
    Subset,
    attach,
    get_method,
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
class ShuffledSubset(CacheMethod):
    """Test method: step 0 computes; later steps recompute ALL tokens as a per-row random subset."""

    name = "test-shuffled-subset"

    def reset(self):
        self.generator = torch.Generator().manual_seed(0)

    def branch_action(self, step, block, branch):
        if step == 0:
            return COMPUTE
        order = [torch.randperm(self.info.num_tokens, generator=self.generator) for _ in range(self.rows)]
        return Subset(torch.stack(order))

    def observe(self, step, block, branch, *, x, output, attention):
        self.rows = x.shape[0]


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

    def block_action(self, step, block):
        if 1 <= block <= 2:
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
