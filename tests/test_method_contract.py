"""The contract every registered method keeps (built-ins and any plugin found), checked without naming it.

For each method at its defaults (a random calibration file where it needs one), on a tiny DiT and
a tiny MDTv2:

* a sample's image does not depend on its batch: byte-identical at batch sizes 1, 7 and 32;
* its ``noop`` settings give the uncached model's samples and count every token;
* the tokens it records are the tokens the model really computed (hooks on every attention and
  MLP module count query rows and tokens), and the blocks it records as run really ran;
* the MACs priced from its counts (plus the overhead it declares as traced) equal fvcore's
  count of every traced step;
* it reads no device value on the host inside the sampling loop unless it declares
  ``host_sync`` (and, if it declares it, the engine counted the reads).

A plugin is checked by this file when it is registered: ``TOKENCACHE_PLUGINS=DIR pytest
tests/test_method_contract.py``.
"""
from __future__ import annotations

import warnings
from collections import defaultdict

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import TINY, randomize, readme_examples
from tokencache.cache import attach, available_methods, get_method, load_plugins, method_class, reference_method
from tokencache.cache.calibration import write_random_calibration
from tokencache.metrics.flops import execution_blocks, sampling_macs
from tokencache.models import create_model
from tokencache.models.layers import Attention, Mlp, TransformerBlock
from tokencache.models.vae import images_to_uint8
from tokencache.sampling import draw_labels, generate, parse_sampler, sample_generators

SAMPLER = "ddim8"
load_plugins(readme_examples()[0])  # the worked examples of baselines/README.md keep the contract too
METHODS = sorted(available_methods())
#: (method, parameters): every method at its defaults, and each variant it declares
CASES = [(name, params) for name in METHODS for params in ({}, *method_class(name).variants)]
CASE_IDS = [name + "".join(f"[{k}={v}]" for k, v in params.items()) for name, params in CASES]
FAMILIES = ("DiT", "MDTv2")
#: what counts as reading a device value on the host
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "nonzero", "cpu")


@pytest.fixture(scope="module")
def models():
    return {"DiT": randomize(create_model("DiT", **TINY)).eval(),
            "MDTv2": randomize(create_model("MDTv2", **dict(TINY, depth=6), decode_layer=2)).eval()}


@pytest.fixture(scope="module")
def calibrations(models, tmp_path_factory):
    """A random calibration file per (method variant, family) for the methods that need one."""
    folder = tmp_path_factory.mktemp("calibration")
    files = {}
    for name, params in CASES:
        calibration = method_class(name).calibration
        if calibration is None:
            continue
        method = get_method(name, **params)
        for family, model in models.items():
            key = (method.calibration_id(), family)
            if key not in files:
                files[key] = {calibration.file_param: write_random_calibration(
                    method, model, SAMPLER, folder / f"{key[0]}-{family}.pt", seed=3)}
    return files


def defaults(case, family, calibrations, **extra):
    """The method of ``case`` (name, parameters) with its calibration file and ``extra`` parameters."""
    name, params = case
    method = get_method(name, **params)
    return get_method(name, **params, **calibrations.get((method.calibration_id(), family), {}), **extra)


def sample(model, method, indices, batch_size, sampler=SAMPLER):
    """uint8 images of samples ``indices`` in batches of ``batch_size`` (the engine of the last batch)."""
    images = []
    with attach(model, method, sampler) as engine:
        for lo in range(0, len(indices), batch_size):
            chunk = list(indices[lo:lo + batch_size])
            gens = sample_generators(7, chunk)
            x = generate(model, engine.sampler, draw_labels(gens, 10), gens, cfg_scale=2.0, clip_denoised=True,
                         step_listener=engine.step_listener)
            images.append(images_to_uint8(x, model.config["family"]))
    return np.concatenate(images), engine


@pytest.mark.slow  # with the other sampling one: ~170 s for 76 cases on a busy 2-core machine
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_a_sample_depends_only_on_its_seed_and_index(case, family, models, calibrations):
    model = models[family]
    alone, _ = sample(model, defaults(case, family, calibrations), range(32), 1)
    sevens, _ = sample(model, defaults(case, family, calibrations), range(32), 7)
    together, _ = sample(model, defaults(case, family, calibrations), range(32), 32)
    assert np.array_equal(alone, sevens) and np.array_equal(alone, together)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_noop_settings_equal_the_uncached_model(case, family, models, calibrations):
    name = case[0]
    cls = method_class(name)
    assert cls.noop is not None, f"{name}: declare `noop`, the parameters with which it computes everything"
    model = models[family]
    gens = sample_generators(7, range(3))
    want = generate(model, SAMPLER, draw_labels(gens, 10), gens, cfg_scale=2.0, clip_denoised=True)
    with attach(model, defaults((name, {**case[1], **cls.noop}), family, calibrations), SAMPLER) as engine:
        gens = sample_generators(7, range(3))
        got = generate(model, engine.sampler, draw_labels(gens, 10), gens, cfg_scale=2.0, clip_denoised=True,
                       step_listener=engine.step_listener)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (engine.counts == model.num_tokens).all() and (engine.blocks_run == 1).all()


class _Instrument:
    """Forward hooks counting the tokens each attention and MLP really computed, per step and block."""

    def __init__(self, model, engine):
        self.engine = engine
        self.tokens = defaultdict(int)  # (step, block, branch) → tokens × rows
        self.blocks = defaultdict(int)  # (step, block) → rows
        self.handles = []
        for index, block in enumerate(execution_blocks(model)):
            self.handles.append(block.attn.register_forward_pre_hook(self._attention(index), with_kwargs=True))
            self.handles.append(block.mlp.register_forward_pre_hook(self._mlp(index)))
            self.handles.append(block.register_forward_pre_hook(self._block(index)))

    def _attention(self, index):
        def hook(module, args, kwargs):
            x = args[0]
            queries = kwargs.get("query_index", args[1] if len(args) > 1 else None)
            tokens = x.shape[1] if queries is None else queries.shape[1]
            self.tokens[self.engine.step, index, 0] += tokens * x.shape[0]
        return hook

    def _mlp(self, index):
        def hook(module, args):
            self.tokens[self.engine.step, index, 1] += args[0].shape[1] * args[0].shape[0]
        return hook

    def _block(self, index):
        def hook(module, args):
            self.blocks[self.engine.step, index] += args[0].shape[0]
        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_recorded_counts_are_the_tokens_really_computed(case, family, models, calibrations):
    name = case[0]
    model = models[family]
    method = defaults(case, family, calibrations)
    if method.passthrough:
        pytest.skip(f"{name} never changes a branch: the model runs untouched")
    with attach(model, method, SAMPLER) as engine:
        instrument = _Instrument(model, engine)
        try:
            gens = sample_generators(7, range(5))
            generate(model, engine.sampler, draw_labels(gens, 10), gens, cfg_scale=2.0, clip_denoised=True,
                     step_listener=engine.step_listener)
        finally:
            instrument.remove()
    record = engine.record
    steps, blocks = record.token_sums.shape[:2]
    for k in range(steps):
        for b in range(blocks):
            for branch in range(2):
                computed = record.token_sums[k, b, branch] + record.shadow_token_sums[k, b, branch]
                assert computed == instrument.tokens[k, b, branch], (k, b, branch)
            assert record.block_sums[k, b] + record.shadow_block_sums[k, b] == instrument.blocks[k, b], (k, b)


class _HostReads(TorchFunctionMode):
    """Counts calls that read a device value on the host (``.item()``, ``bool(t)``, ``.cpu()``, …).

    A copy to the CPU of a tensor already there is no read (the sampling loop moves the labels
    ``to`` their device); on a GPU machine the same check sees the real transfers.
    """

    def __init__(self):
        super().__init__()
        self.calls = defaultdict(int)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        kwargs = kwargs or {}
        to_host = (name == "to" and args and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu"
                   and any(str(a) == "cpu" for a in list(args[1:]) + list(kwargs.values())))
        if name in HOST_READS or to_host:
            self.calls[name] += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_no_host_reads_in_the_loop_unless_declared(case, family, models, calibrations):
    name = case[0]
    model = models[family]
    method = defaults(case, family, calibrations)
    with attach(model, method, SAMPLER) as engine:
        gens = sample_generators(7, range(3))
        labels = draw_labels(gens, 10)
        with _HostReads() as reads:
            generate(model, engine.sampler, labels, gens, cfg_scale=2.0, clip_denoised=True,
                     step_listener=engine.step_listener)
    if not method.host_sync:
        assert not reads.calls, f"{name} reads device values on the host ({dict(reads.calls)}) without host_sync"
    else:
        assert engine.summary()["host_syncs"] > 0


def test_the_reference_reads_nothing(models):
    """The uncached loop itself never reads a device value: what the test above finds is the method's."""
    model = models["DiT"]
    gens = sample_generators(7, range(3))
    labels = draw_labels(gens, 10)
    with attach(model, reference_method(), SAMPLER) as engine, _HostReads() as reads:
        generate(model, engine.sampler, labels, gens, cfg_scale=2.0, step_listener=engine.step_listener)
    assert not reads.calls


def _fvcore_macs(model, inputs) -> int:
    from tokencache.metrics.flops import count_macs

    return count_macs(model, *inputs)


@pytest.mark.slow  # with the other sampling one: ~170 s for 76 cases on a busy 2-core machine
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_macs_from_counts_equal_fvcore_on_the_traced_steps(case, family, models, calibrations):
    """Every step traced by fvcore, the engine deciding inside the trace; the sum equals the priced counts.

    The inputs drift from step to step (so that runtime-signal methods decide both ways); they are
    not a real trajectory, which the accounting does not need.
    """
    name = case[0]
    model = models[family]
    method = defaults(case, family, calibrations)
    if method.passthrough:
        pytest.skip(f"{name} never changes a branch: priced as the full model (tests/test_flops.py)")
    sampler = parse_sampler(SAMPLER)
    g = torch.Generator().manual_seed(0)
    rows = 6
    x = torch.randn(rows, model.in_channels, model.input_size, model.input_size, generator=g)
    y = torch.arange(rows) % 10
    timesteps = sampler.diffusion().timestep_map
    traced = 0
    with attach(model, method, sampler) as engine:
        for k in range(sampler.steps):
            engine.begin_step(k)
            x = x + 0.3 * (k % 3) * torch.randn(x.shape, generator=g)
            t = torch.full((rows,), int(timesteps[sampler.steps - 1 - k]))
            traced += _fvcore_macs(model, (x, t, y))
    summary = engine.summary(counts=True)
    priced = sampling_macs(model, summary, cfg=False)
    counted = priced["macs_per_image"] * rows
    traced_overhead = sum(priced["overhead_macs"].get(c, 0) for c in type(method).traced_overhead) * rows
    assert traced == pytest.approx(counted + traced_overhead, rel=1e-9, abs=0.5)
    assert not priced["overhead_unpriced"], f"{name}: price the counters {priced['overhead_unpriced']}"
