"""Engine features that name no method: block outputs to ``observe_block``, a token subset whose result
the method finishes (``Subset(finish=…)``), per-sample seeds (``bind_samples`` / ``sample_seeds``),
counted host reads (``to_host``), a forecast for some rows only (``Forecast(rows=…)``) and a shadow
computation of a block (``BlockInput.shadow``)."""
from dataclasses import dataclass

import pytest
import torch

from conftest import TINY
from tokencache.cache import COMPUTE, CacheMethod, Forecast, Subset, attach, get_method
from tokencache.sampling import draw_labels, generate, sample_generators, sample_seed

SAMPLER = "ddim4"


def sample(model, method, indices=(0, 1), cfg=2.0):
    with attach(model, method, SAMPLER) as engine:
        gens = sample_generators(5, list(indices))
        x = generate(model, engine.sampler, draw_labels(gens, 10), gens, cfg_scale=cfg, clip_denoised=True,
                     step_listener=engine.step_listener)
    return x, engine


@dataclass
class Watcher(CacheMethod):
    name = "test-watcher"

    def __post_init__(self):
        super().__post_init__()
        self.blocks, self.inputs, self.seeds = {}, {}, []

    def begin_step(self, step):
        self.seeds.append(self.sample_seeds)

    def block_action(self, step, block, inputs):
        self.inputs[(int(step), block)] = inputs.x.clone()
        return None

    def observe_block(self, step, block, output):
        self.blocks[(int(step), block)] = output.clone()


def test_observe_block_sees_each_blocks_output_and_the_samples_seeds(tiny_dit):
    method = Watcher()
    sample(tiny_dit, method)
    for (k, b), out in method.blocks.items():
        if b + 1 < TINY["depth"]:
            assert torch.equal(out, method.inputs[(k, b + 1)])  # what the next block receives
    assert len(method.blocks) == 4 * TINY["depth"]
    assert method.seeds == [(sample_seed(5, 0), sample_seed(5, 1))] * 4
    # a generation not told its samples sees None
    with attach(tiny_dit, method, SAMPLER) as engine:
        engine.begin_step(0)
        assert method.sample_seeds is None


@dataclass
class Finisher(CacheMethod):
    """Even steps compute; odd steps recompute MLP tokens 0 and 3 and finish with 2 × the stored plus the fresh."""

    name = "test-finisher"

    def __post_init__(self):
        super().__post_init__()
        self.kept, self.seen = {}, []

    def branch_action(self, step, block, branch):
        if step % 2 == 0 or branch == "attn":
            return COMPUTE
        tokens = torch.tensor([[0, 3]]).expand(self._rows, -1)
        old = self.kept[block]

        def finish(fresh):
            self.seen.append(fresh.shape)
            out = old * 2
            out[:, [0, 3]] = fresh
            return out
        return Subset(tokens, finish=finish)

    def observe(self, step, block, branch, *, x, output, attention, rows):
        self._rows = output.shape[0]
        if branch == "mlp":
            self.kept[block] = output.clone()


def test_subset_finish_returns_the_methods_output_and_counts_the_tokens(tiny_dit):
    method = Finisher()
    _, engine = sample(tiny_dit, method)
    assert method.seen and all(s == (4, 2, 32) for s in method.seen)
    assert (engine.counts[1, :, 1] == 2).all() and (engine.counts[0] == 16).all()
    assert (engine.counts[1, :, 0] == 16).all()


def test_to_host_counts_a_synchronisation(tiny_dit):
    method = get_method("full")
    method._host_read = None
    assert method.to_host(torch.tensor([1, 2])) == [1, 2]
    counted = []
    method._host_read = lambda: counted.append(1)
    method.to_host(torch.tensor([True]))
    assert counted == [1]


@dataclass
class ShadowForecaster(CacheMethod):
    """Step 0 computes; later, rows 0 and 2 take the stored step-0 output as a forecast and the
    others compute; the last block is also run in shadow for row 1."""

    name = "test-shadow-forecaster"
    host_sync = True

    def __post_init__(self):
        super().__post_init__()
        self.kept, self.shadows, self.observed = {}, [], []

    def block_action(self, step, block, inputs):
        if block == TINY["depth"] - 1 and step > 0:
            self.shadows.append((inputs.x.clone(), inputs.shadow(rows=torch.tensor([1]))))
        return None

    def branch_action(self, step, block, branch):
        if step == 0:
            return COMPUTE
        mask = torch.tensor([True, False, True, False])
        return Forecast(self.kept[(block, branch)], rows=mask)

    def observe(self, step, block, branch, *, x, output, attention, rows):
        self.observed.append((int(step), None if rows is None else rows.tolist()))
        if step == 0:
            self.kept[(block, branch)] = output.clone()


def test_forecast_rows_and_shadow(tiny_dit):
    method = ShadowForecaster()
    x, engine = sample(tiny_dit, method)
    record = engine.record
    # rows 1 and 3 computed on later steps: half the tokens per row, observed for those rows only
    assert (engine.counts[1:] == 8).all() and (engine.counts[0] == 16).all()
    assert all(rows == [1, 3] for step, rows in method.observed if step > 0)
    # the shadow: one row of the last block per later step, apart from the model's counts
    assert (record.shadow_token_sums[1:, -1] == 16).all() and record.shadow_token_sums[:, :-1].sum() == 0
    assert (record.shadow_block_sums[1:, -1] == 1).all() and (engine.blocks_run == 1).all()
    assert engine.summary()["host_syncs"] > 0
    # the shadow output has row 1 only, and the images equal a run without the shadow
    x_in, shadow = method.shadows[0]
    assert shadow.shape == (1,) + x_in.shape[1:]
    plain = ShadowForecaster()
    type(plain).block_action = CacheMethod.block_action
    try:
        y, _ = sample(tiny_dit, plain)
    finally:
        type(plain).block_action = ShadowForecaster.block_action
    assert torch.equal(x, y)


def test_forecast_rows_without_host_sync_selects_per_row(tiny_dit):
    """Without host_sync every row is computed, the forecast kept where the mask says, and observe sees all rows."""
    method = ShadowForecaster()
    method.host_sync = False
    type(method).block_action = CacheMethod.block_action
    try:
        _, engine = sample(tiny_dit, method)
    finally:
        type(method).block_action = ShadowForecaster.block_action
    assert (engine.counts == 16).all()
    assert all(rows is None for _, rows in method.observed)
