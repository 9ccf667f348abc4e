"""The method API's shared pieces: the Step the hooks receive, the public calibration API, the models'
``embed``, and the rules the built-in methods keep (no method imports another; none reaches into a
model's submodules by name; helpers are not methods)."""
import ast
import io
import json
import pickle
from pathlib import Path

import pytest
import torch

from conftest import TINY, randomize
from tokencache.cache import (
    COMPUTE,
    Blend,
    CacheMethod,
    FitHistory,
    SamplingSettings,
    Step,
    Trajectories,
    attach,
    available_methods,
    batch_rows,
    fit_relaxation,
    model_info,
    record_trajectories,
    relaxation_batches,
    replay_trajectories,
    sample_batches,
    sampling_steps,
)
from tokencache.models import create_model
from tokencache.sampling import draw_labels, generate, parse_sampler, sample_generators

BASELINES = Path(__file__).resolve().parents[1] / "baselines"
#: attributes naming a model's submodules or parameters (DiT, MDT, MDTv2): a method reads the model
#: only through ModelInfo, BlockInput, the engine and the models' public methods (``embed``)
MODEL_INTERNALS = {"x_embedder", "t_embedder", "y_embedder", "pos_embed", "decoder_pos_embed", "final_layer",
                   "blocks", "en_inblocks", "en_outblocks", "de_blocks", "sideblocks", "adaLN_modulation", "attn",
                   "mlp", "proj"}


def baseline_files():
    return sorted(p for p in BASELINES.glob("*.py") if p.name != "__init__.py")


# ---------------------------------------------------------------------- the rules of baselines/


def imported_baselines(tree: ast.AST) -> list[tuple[str, int]]:
    """(module of baselines/ imported, line) for every import in ``tree``, relative ones included."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[:2] == ["tokencache", "baselines"] and len(parts) > 2:
                    found.append((parts[2], node.lineno))
                elif parts[0] == "baselines" and len(parts) > 1:
                    found.append((parts[1], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            if node.level:  # from . import x / from .x import y
                found += [(parts[0], node.lineno)] if parts[0] else [(a.name, node.lineno) for a in node.names]
            elif parts[:2] == ["tokencache", "baselines"]:
                found += [(parts[2], node.lineno)] if len(parts) > 2 else [(a.name, node.lineno) for a in node.names]
            elif parts[0] == "baselines":
                found += [(parts[1], node.lineno)] if len(parts) > 1 else [(a.name, node.lineno) for a in node.names]
    return found


def test_no_method_imports_another_method():
    """A module of baselines/ imports only helpers (files starting with ``_``) of baselines/, and tokencache."""
    offences = []
    for path in baseline_files():
        for module, line in imported_baselines(ast.parse(path.read_text())):
            if not module.startswith("_"):
                offences.append(f"{path.name}:{line} imports the method module {module}")
    assert not offences, offences


def test_the_import_checker_sees_method_imports():
    planted = ("from tokencache.baselines.toca import x\nfrom tokencache.baselines import duca, _scores\n"
               "import tokencache.baselines.fora\nfrom . import l2c\nfrom .teacache import y\n"
               "from tokencache.baselines._scores import z\n")
    modules = sorted(m for m, _ in imported_baselines(ast.parse(planted)))
    assert modules == ["_scores", "_scores", "duca", "fora", "l2c", "teacache", "toca"]


def model_internal_accesses(tree: ast.AST) -> list[tuple[str, int]]:
    return [(node.attr, node.lineno) for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr in MODEL_INTERNALS]


def test_no_method_reaches_into_a_models_submodules():
    offences = [f"{path.name}:{line} .{attr}" for path in baseline_files()
                for attr, line in model_internal_accesses(ast.parse(path.read_text()))]
    assert not offences, offences


def test_the_submodule_checker_sees_accesses():
    planted = "z = model.x_embedder(x) + model.pos_embed\nhook = model.final_layer\nb = block.attn.proj\n"
    assert sorted(a for a, _ in model_internal_accesses(ast.parse(planted))) == [
        "attn", "final_layer", "pos_embed", "proj", "x_embedder"]


def test_helper_modules_are_not_methods():
    """Files starting with ``_`` hold shared code; the registry imports only the others as methods."""
    helpers = [p.stem for p in baseline_files() if p.stem.startswith("_")]
    assert {"_scores", "_force_fresh", "_tokencache_v2", "_tokencache_predictor"} <= set(helpers)
    methods = available_methods()
    assert not any(name.startswith("_") for name in methods)
    for helper in helpers:  # importable, registering nothing
        before = set(available_methods())
        __import__(f"tokencache.baselines.{helper}")
        assert set(available_methods()) == before


# ---------------------------------------------------------------------- the step object


def test_step_carries_k_the_countdown_index_timestep_and_count():
    step = Step(3, 20, 849)
    assert (step.k, step.countdown, step.timestep, step.num_steps) == (3, 16, 849, 20)
    assert step == 3 and hash(step) == hash(3) and [10, 11, 12, 13][step] == 13 and step % 2 == 1
    assert json.dumps({"step": step}) == '{"step": 3}'
    assert pickle.loads(pickle.dumps(step)).countdown == 16
    with pytest.raises(AttributeError):
        step.timestep = 1
    with pytest.raises(ValueError):
        Step(20, 20)
    steps = sampling_steps(4)
    assert [(s.k, s.countdown, s.timestep) for s in steps] == [(0, 3, None), (1, 2, None), (2, 1, None), (3, 0, None)]


class _StepRecorder(CacheMethod):
    """Records the Step every hook receives."""

    name = "step-recorder"

    def __init__(self):
        self.seen = []

    def params(self):
        return {}

    def begin_step(self, step):
        self.seen.append(("begin", step))

    def block_action(self, step, block, inputs):
        self.seen.append(("block", step))
        return None

    def branch_action(self, step, block, branch):
        self.seen.append(("branch", step))
        return COMPUTE


@pytest.mark.parametrize("sampler", ["ddim20", "ddpm40"])
def test_hooks_receive_the_step_on_a_respaced_sampler(sampler):
    model = randomize(create_model("DiT", **TINY)).eval()
    recorder = _StepRecorder()
    gens = sample_generators(0, range(2))
    with attach(model, recorder, sampler) as engine:
        generate(model, engine.sampler, draw_labels(gens, 10), gens, cfg_scale=1.5, step_listener=engine.step_listener)
    spaced = parse_sampler(sampler).diffusion().timestep_map  # respaced index → original timestep
    T = parse_sampler(sampler).steps
    assert {kind for kind, _ in recorder.seen} == {"begin", "block", "branch"}
    begun = [step for kind, step in recorder.seen if kind == "begin"]
    assert [step.k for step in begun] == list(range(T))
    for kind, step in recorder.seen:
        assert isinstance(step, Step) and step.num_steps == T
        assert step.countdown == T - 1 - step.k  # the official count-down index s
        assert step.timestep == int(spaced[step.countdown])  # the original 0–999 timestep the model sees
    assert begun[0].timestep > begun[-1].timestep and begun[-1].countdown == 0
    info = model_info(model, parse_sampler(sampler))
    assert info.steps == tuple(begun) and [s.timestep for s in info.steps] == list(info.timesteps)


# ---------------------------------------------------------------------- the models' embed


@pytest.mark.parametrize("family", ["DiT", "MDTv2"])
def test_embed_is_what_block_0_receives(family):
    extra = {"decode_layer": 2} if family == "MDTv2" else {}
    model = randomize(create_model(family, **TINY, **extra)).eval()
    seen = {}

    class Spy(CacheMethod):
        name = "spy"

        def params(self):
            return {}

        def block_action(self, step, block, inputs):
            if block == 0:
                seen["x"], seen["c"] = inputs.x, inputs.c
            return None

    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([900, 500, 10]), torch.tensor([1, 2, 10])
    with attach(model, Spy(), "ddim4") as engine, torch.no_grad():
        engine.begin_step(0)
        model(x, t, y)
        z, c = model.embed(x, t, y)
    assert torch.equal(z, seen["x"]) and torch.equal(c, seen["c"])


# ---------------------------------------------------------------------- the calibration API


@pytest.fixture(scope="module")
def trajectories_and_model():
    model = randomize(create_model("DiT", **TINY)).eval().requires_grad_(False)
    sampler = parse_sampler("ddim5")
    trajectories = record_trajectories(model, sampler, SamplingSettings(cfg_scale=2.0), seed=4, num_samples=3,
                                       batch_size=2, progress=False)
    return model, sampler, trajectories


def test_trajectories_are_the_sampling_runs_model_inputs(trajectories_and_model):
    model, sampler, trajectories = trajectories_and_model
    assert isinstance(trajectories, Trajectories) and trajectories.num_samples == 3
    x, t, y = trajectories  # unpacks as before
    assert len(x) == len(t) == 5 and x[0].shape == (3, 2, 1, 8, 8) and y.shape == (3, 2)
    assert (y[:, 1] == model.num_classes).all()  # CFG: the null-label row of each sample
    index = torch.tensor([2, 0])
    xs, ts, ys = trajectories.rows(3, index)
    assert torch.equal(xs, batch_rows(x[3], index)) and torch.equal(ys, torch.cat([y[[2, 0], 0], y[[2, 0], 1]]))
    assert ts.shape == (4,) and (ts == t[3]).all()
    assert [b.tolist() for b in sample_batches(5, 2, "cpu")] == [[0, 1], [2, 3], [4]]
    # the first step's input is the sampling run's noise of (seed, index)
    gens = sample_generators(4, [1])
    draw_labels(gens, model.num_classes)
    noise = torch.randn(1, 1, 8, 8, generator=gens[0])
    torch.testing.assert_close(x[0][1, 0], noise[0])


def test_replay_runs_every_recorded_step_with_the_method(trajectories_and_model):
    model, sampler, trajectories = trajectories_and_model
    recorder = _StepRecorder()
    calls = [(r.index.tolist(), r.step, tuple(r.output.shape)) for r in
             replay_trajectories(model, sampler, recorder, trajectories, batch_size=2)]
    assert calls == [([0, 1], k, (4, 2, 8, 8)) for k in range(5)] + [([2], k, (2, 2, 8, 8)) for k in range(5)]
    with torch.no_grad():
        full = model(*trajectories.rows(4, torch.tensor([2])))
    last = list(replay_trajectories(model, sampler, recorder, trajectories, batch_size=2))[-1]
    assert torch.equal(last.output, full)


class _ScalarRelaxation(CacheMethod):
    """Every branch at ``relaxed_step`` blends stored and fresh with one learnable weight σ(θ)."""

    name = "scalar-relaxation"

    def __init__(self, theta):
        self.theta, self.relaxed_step = theta, -1

    def params(self):
        return {}

    def branch_action(self, step, block, branch):
        return Blend(torch.sigmoid(self.theta)) if step == self.relaxed_step else COMPUTE


def test_fit_relaxation_steps_records_and_logs(trajectories_and_model):
    model, sampler, trajectories = trajectories_and_model
    theta = torch.nn.Parameter(torch.tensor(-2.0))
    relaxation = _ScalarRelaxation(theta)
    log, steps = io.StringIO(), []
    generator = torch.Generator().manual_seed(0)

    def loss_terms(batch):
        steps.append(batch.step)
        error = ((batch.relaxed() - batch.target) ** 2).mean()
        return {"step": batch.step.k, "loss": error, "weight": torch.sigmoid(theta)}

    history = fit_relaxation(model, sampler, relaxation, trajectories, torch.optim.SGD([theta], lr=50.0), loss_terms,
                             updates=6, batch_size=2, num_samples=3, generator=generator, pick_step=lambda: 2,
                             progress=False, desc="test", log=log, after_update=lambda: theta.data.clamp_(-5, 5))
    assert isinstance(history, FitHistory) and [h["update"] for h in history] == list(range(6))
    assert all(isinstance(s, Step) and s.k == 2 and s.countdown == 2 for s in steps)
    assert [json.loads(line) for line in log.getvalue().splitlines()] == list(history)
    assert list(history[0]) == ["update", "step", "loss", "weight"] and isinstance(history[0]["loss"], float)
    assert history[-1]["weight"] > history[0]["weight"] and float(theta.detach()) <= 5  # w → 1 removes the error
    assert history.first_mean("loss", 2) == (history[0]["loss"] + history[1]["loss"]) / 2
    assert history.last_mean("loss", 3) == sum(h["loss"] for h in history[-3:]) / 3


def test_relaxation_batches_fill_the_cache_at_the_previous_step(trajectories_and_model):
    model, sampler, trajectories = trajectories_and_model
    relaxation = _ScalarRelaxation(torch.tensor(20.0))  # σ ≈ 1: the relaxed output is the full one
    batches = relaxation_batches(model, sampler, relaxation, trajectories, 2, 2, 3, torch.Generator().manual_seed(1),
                                 lambda: 3, False, "test")
    for batch in batches:
        assert relaxation.relaxed_step == batch.step == 3
        with torch.no_grad():
            torch.testing.assert_close(batch.relaxed(), batch.target, rtol=1e-5, atol=1e-5)


def test_search_spaces_are_valid_distinct_settings():
    """Every declared search space: points that build the method, all distinct, each knob a real parameter;
    `tokencache methods --json` reports it; a space naming no parameter fails in one line."""
    import dataclasses

    from tokencache.cache import available_methods, describe_methods, method_class, search_points

    described = {m["name"]: m for m in describe_methods()}
    with_space = 0
    for name in available_methods():
        cls = method_class(name)
        points = search_points(name)
        assert len({tuple(sorted(p.items())) for p in points}) == len(points), name
        fields = {f.name for f in dataclasses.fields(cls)}
        assert all(set(p) <= fields for p in points), name
        info = described[name]["search_space"]
        assert (info is None) == (not points), name
        if points:
            with_space += 1
            assert info["points"] == len(points)
    assert with_space >= 13  # every built-in method with a strength, reference and full aside
    tokencache_points = search_points("tokencache")
    assert len(tokencache_points) == 27 and all(p["k2"] <= p["k1"] for p in tokencache_points)

    @dataclasses.dataclass
    class Broken(method_class("fora")):
        search_space = {"intervall": (2, 3)}

    with pytest.raises(ValueError, match="not a valid setting"):
        search_points(Broken)
