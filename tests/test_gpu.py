"""The GPU path of the latency harness (issue 7), checked on the CPU where it can be, on CUDA where not.

CPU: TF32 flag set, recorded and restored; compile mode recorded with compiling kept out of the
timed rounds (dynamo's "eager" backend: graph capture without code generation, fast; inductor
in a slow test); bfloat16 autocast close to float32; SDPA used whenever no attention map is
asked for; schedule tensors copied to a device once; the report files (CSV, Markdown, PNG).
CUDA (skipped without a GPU): no host synchronisation inside the sampling loop, bfloat16,
CUDA-event timing, compiled branches (also as CUDA graphs with a cache) equal to eager.
"""
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from tokencache.cache import attach, get_method
from tokencache.cli import main
from tokencache.diffusion import create_diffusion
from tokencache.diffusion.gaussian_diffusion import _on_device
from tokencache.metrics.latency import measure_latency, random_calibration, sdpa_backend
from tokencache.metrics.latency_report import REPORT_COLUMNS, write_latency_report
from tokencache.models.compiled import compiled_branches, graphs_compiled
from tokencache.models.layers import Attention
from tokencache.sampling import draw_labels, generate, sample_generators

def cuda(test):
    """A GPU-path test: marked ``cuda`` (``pytest -m cuda`` selects them, results/gpu/run.sh runs them first)."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))

#: every caching path of the engine: full, reuse, token subsets with attention scores, spans, subsets,
#: forecasts (kept across steps: a CUDA graph's output buffer must not be), spans keeping the last output.
METHODS = [("full", "full", {}), ("fora", "fora", {"interval": 2}), ("toca", "toca", {}),
           ("deepcache", "deepcache", {}),
           ("tokencache", "tokencache", {"token_choice": "random", "block_selection": "uniform"}),
           ("taylorseer", "taylorseer", {}), ("duca", "duca", {})]



def sample(model, method, params, batch, sampler="ddim4", autocast=None):
    gens = sample_generators(0, range(batch))
    labels = draw_labels(gens, model.num_classes)
    device = next(model.parameters()).device
    with attach(model, get_method(method, **params), sampler) as engine:
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            return generate(model, engine.sampler, labels, gens, cfg_scale=1.5, step_listener=engine.step_listener)


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


# --------------------------------------------------------------------------- CPU


def test_tf32_is_set_recorded_and_restored(tiny_dit):
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    for flag in (True, False):
        row = measure_latency(tiny_dit, [("full", "full", {})], sampler="ddim2", repeats=1, warmup=0, tf32=flag)[0]
        prov = row["provenance"]
        assert prov["tf32_requested"] is flag and prov["tf32_matmul"] is flag and prov["tf32_cudnn"] is flag
        assert prov["float32_matmul_precision"] == ("high" if flag else "highest")
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == before
    row = measure_latency(tiny_dit, [("full", "full", {})], sampler="ddim2", repeats=1, warmup=0)[0]
    assert row["provenance"]["tf32_requested"] is None  # left as torch had it


@pytest.mark.slow
def test_compiled_branches_equal_eager_and_compile_once_for_all_blocks(tiny_dit):
    """Dynamo captures each branch once for all blocks (shapes go dynamic), samples are unchanged."""
    eager = {(name, b): sample(tiny_dit, name, params, b) for _, name, params in METHODS for b in (1, 3)}
    start = graphs_compiled()
    with compiled_branches(tiny_dit, "default", backend="eager"):
        for rnd in range(2):
            for b in (1, 3):
                for _, name, params in METHODS:
                    assert torch.equal(sample(tiny_dit, name, params, b), eager[(name, b)])
            if rnd == 0:
                after_first_round = graphs_compiled()
        assert graphs_compiled() == after_first_round  # the second round compiles nothing
    assert 0 < after_first_round - start < 2 * len(tiny_dit.blocks) * len(METHODS)
    assert not any("attn_branch" in vars(block) for block in tiny_dit.blocks)  # restored


def test_compile_mode_recorded_and_compile_time_kept_apart(tiny_dit):
    torch._dynamo.reset()  # graphs compiled by earlier tests would be reused: nothing left to compile
    rows = measure_latency(tiny_dit, METHODS[:3], sampler="ddim4", batch_sizes=[1, 2], repeats=2, warmup=1,
                           compile_mode="default", compile_backend="eager")
    prov = rows[0]["provenance"]
    assert prov["compile_mode"] == "default" and prov["compile_backend"] == "eager" and not prov["cuda_graphs"]
    assert prov["graphs_compiled"] > 0 and prov["graphs_compiled_while_timing"] == 0
    assert prov["compile_warmup_s"] >= sum(r["warmup_sampling_s"][0] for r in rows)
    for row in rows:
        assert len(row["warmup_sampling_s"]) == 1 and len(row["sampling_s"]["values"]) == 2
    first = rows[0]  # full at batch 1 ran first: it paid for tracing the branches
    assert first["warmup_sampling_s"][0] > first["sampling_s"]["max"]
    assert json.loads(json.dumps(rows)) == rows


def test_compile_and_dtype_requests_are_checked(tiny_dit):
    with pytest.raises(ValueError, match="warmup"):
        measure_latency(tiny_dit, [("full", "full", {})], sampler="ddim2", warmup=0, compile_mode="default")
    with pytest.raises(ValueError, match="compile mode"):
        measure_latency(tiny_dit, [("full", "full", {})], sampler="ddim2", compile_mode="fast")
    with pytest.raises(ValueError, match="autocast"):
        measure_latency(tiny_dit.to(torch.bfloat16), [("full", "full", {})], sampler="ddim2")


@pytest.mark.slow
def test_inductor_compile_on_cpu(tiny_dit):
    """Real code generation (C++ on the CPU): ~40 s cold, ~10 s with inductor's cache warm."""
    eager = sample(tiny_dit, "fora", {"interval": 2}, 2)
    with compiled_branches(tiny_dit, "default"):
        assert rel_err(sample(tiny_dit, "fora", {"interval": 2}, 2), eager) < 1e-4
    rows = measure_latency(tiny_dit, METHODS[:2], sampler="ddim4", batch_sizes=[2], repeats=1, warmup=1,
                           compile_mode="default")
    assert rows[0]["provenance"]["compile_backend"] == "inductor"
    assert rows[0]["provenance"]["graphs_compiled_while_timing"] == 0


def test_bfloat16_autocast_on_cpu_is_close_to_float32(tiny_dit, tiny_mdt):
    for model in (tiny_dit, tiny_mdt):
        ref = sample(model, "full", {}, 3)
        assert 0 < rel_err(sample(model, "full", {}, 3, autocast=torch.bfloat16), ref) < 0.05
        assert rel_err(sample(model, "toca", {}, 3, autocast=torch.bfloat16), sample(model, "toca", {}, 3)) < 0.05
    ref = sample(tiny_dit, "full", {}, 3)
    tiny_dit.to(torch.bfloat16)  # pure bf16 weights; autocast casts the float32 noise
    out = sample(tiny_dit, "full", {}, 3, autocast=torch.bfloat16)
    assert out.dtype == torch.float32 and rel_err(out, ref) < 0.05
    row = measure_latency(tiny_dit, [("full", "full", {})], sampler="ddim2", repeats=1, warmup=0, dtype="bfloat16")[0]
    assert row["provenance"]["weights_dtype"] == "bfloat16" and row["provenance"]["autocast"]


def test_sdpa_runs_unless_an_attention_map_is_asked_for(tiny_dit, tiny_mdt, monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    for model in (tiny_dit, tiny_mdt):
        for name, params in (("full", {}), ("fora", {"interval": 2}), ("toca", {"interval": 3}),
                             ("tokencache", {"token_choice": "random", "block_selection": "uniform"})):
            calls.clear()
            gens = sample_generators(0, range(2))
            with attach(model, get_method(name, **params), "ddim6") as engine:
                generate(model, engine.sampler, draw_labels(gens, 10), gens, cfg_scale=1.5,
                         step_listener=engine.step_listener)
                summary = engine.summary()
            attn_computed = int((np.asarray(summary["counts"])[..., 0] > 0).sum()) if summary["rows"] else (
                6 * model.block_count)
            explicit = summary["overhead"].get("explicit_attention", {"total": 0})["total"]
            assert len(calls) == attn_computed - explicit, name  # toca: attention only on its scoring steps
            assert (explicit > 0) == (name == "toca") and (len(calls) > 0) == (name != "toca")
    attn = next(m for m in tiny_mdt.modules() if isinstance(m, Attention))
    calls.clear()
    attn(torch.randn(2, tiny_mdt.num_tokens, 32), return_attention=True)
    assert calls == []
    names = {"flash_attention", "efficient_attention", "math", "cudnn_attention", "overrideable"}
    assert sdpa_backend(tiny_dit, 2, torch.float32, torch.device("cpu")) in names
    assert sdpa_backend(tiny_mdt, 2, torch.bfloat16, torch.device("cpu")) in names


def test_schedule_tensors_are_copied_to_a_device_once(tiny_dit):
    """What keeps blocking host→device copies out of the loop, checked on the meta device."""
    d = create_diffusion("ddim10")
    meta = torch.device("meta")
    assert _on_device(d.alphas_cumprod, meta) is _on_device(d.alphas_cumprod, meta)
    t = torch.zeros(3, dtype=torch.int64, device=meta)
    d.model_timesteps(t)
    assert len(d._map_tensors) == 1 and d.model_timesteps(t).device == meta
    emb = tiny_dit.t_embedder
    emb(torch.tensor([3, 999]))
    freqs = emb._freqs
    emb(torch.tensor([5, 7]))
    assert emb._freqs is freqs and freqs.dtype == torch.float32
    tiny_dit.to(torch.bfloat16)
    assert emb._freqs.dtype == torch.float32  # not a buffer: casting the model cannot round it


def test_random_calibration_for_timing(tiny_dit, tmp_path):
    methods, notes = random_calibration([("full", "full", {}), ("l2c", "l2c", {}), ("tc", "tokencache", {})],
                                        tiny_dit, "ddim4", tmp_path)
    assert methods[0] == ("full", "full", {}) and set(notes) == {"l2c", "tc"}
    rows = measure_latency(tiny_dit, methods, sampler="ddim4", repeats=1, warmup=0, notes=notes)
    by = {r["label"]: r for r in rows}
    # L2C on DDIM-4: respaced steps 2 and 0 are routed; half of their 2·L branches reused → 3/4 of the tokens
    with attach(tiny_dit, get_method("l2c", **methods[1][2]), "ddim4") as engine:
        generate(tiny_dit, engine.sampler, torch.arange(2), sample_generators(0, range(2)), cfg_scale=1.5,
                 step_listener=engine.step_listener)
        assert engine.summary()["token_fraction"] == 0.75
    assert by["l2c"]["macs_speedup"] > 1.2 and by["tc"]["macs_speedup"] > 1.0
    assert "random L2C router" in by["l2c"]["note"] and by["full"]["note"] is None


def test_report_files_from_a_cpu_run(tiny_dit, tmp_path):
    tiny_dit.config = {**tiny_dit.config, "name": "tiny-DiT"}
    for sampler in ("ddim4", "ddim6"):
        rows = measure_latency(tiny_dit, METHODS[:2] + [("steps", "steps", {"fraction": 0.5})], sampler=sampler,
                               batch_sizes=[1, 2], repeats=2, warmup=0)
        (tmp_path / f"{sampler}.json").write_text(json.dumps({"rows": rows}))
    out = write_latency_report([tmp_path / "ddim4.json", tmp_path / "ddim6.json"], tmp_path / "gpu")
    assert out["rows"] == 12 and out["configurations"] == 2
    table = pd.read_csv(out["csv"])
    assert list(table.columns) == REPORT_COLUMNS
    assert list(table["label"][:6]) == ["full", "full", "fora", "fora", "steps", "steps"]  # given order, then batch
    full = table[table["method"] == "full"]
    assert np.allclose(full["speedup"], 1.0) and np.allclose(full["realization_ratio"], 1.0)
    fora = table[table["label"] == "fora"]
    assert np.allclose(fora["realization_ratio"], fora["speedup"] / fora["macs_speedup"])
    md = open(out["md"]).read()
    assert "| label" in md and "realization_ratio" in md and "## tiny-DiT ddim6" in md and "Warning" not in md
    png = open(out["plot"], "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_cli_latency_with_random_calibration_and_report(tmp_path, capsys):
    run = tmp_path / "digits.json"
    assert main(["latency", "--model", "DiT-digits", "--sampler", "ddim4", "--batch-sizes", "1", "2",
                 "--repeats", "1", "--warmup", "0", "--device", "cpu", "--tf32", "--quiet",
                 "--method", "l2c", "--method", "tokencache", "--method", "steps=steps:fraction=0.5",
                 "--random-calibration", str(tmp_path / "cal"), "--out", str(run)]) == 0
    rows = json.loads(run.read_text())["rows"]
    assert [r["label"] for r in rows[:4]] == ["full", "l2c", "tokencache", "steps"]
    assert rows[0]["model"] == "DiT-digits" and rows[0]["provenance"]["tf32_requested"] is True
    assert main(["latency-report", str(run), "--out-dir", str(tmp_path / "gpu"), "--quiet"]) == 0
    assert {p.name for p in (tmp_path / "gpu").iterdir()} == {"latency.csv", "latency.md", "realization_ratio.png"}
    md = (tmp_path / "gpu" / "latency.md").read_text()
    assert "random L2C router" in md
    machine = json.loads(run.read_text())["machine"]  # the CPU and the load around the timing, in the report
    assert f"load average {machine['load_average_before']} before, {machine['load_average_after']} after" in md
    capsys.readouterr()
    assert main(["latency", "--model", "DiT-digits", "--cast-weights", "--device", "cpu"]) == 2
    assert "--cast-weights needs" in capsys.readouterr().err


# --------------------------------------------------------------------------- CUDA


@cuda
def test_sampling_loop_never_waits_for_the_gpu(tiny_dit, tiny_mdt):
    """torch's sync debug mode turns every host synchronisation (.item(), blocking copies) into an error."""
    for model in (tiny_dit.cuda(), tiny_mdt.cuda()):
        for _, name, params in METHODS:
            sample(model, name, params, 2)  # first run: lazy CUDA initialisation may synchronise
            torch.cuda.set_sync_debug_mode("error")
            try:
                sample(model, name, params, 2)
            finally:
                torch.cuda.set_sync_debug_mode("default")


@cuda
def test_bfloat16_on_cuda_is_close_and_uses_a_fused_kernel(tiny_dit):
    cpu_ref = sample(tiny_dit, "full", {}, 3)
    model = tiny_dit.cuda()
    ref = sample(model, "full", {}, 3)
    assert rel_err(ref.cpu(), cpu_ref) < 1e-3
    assert rel_err(sample(model, "full", {}, 3, autocast=torch.bfloat16), ref) < 0.05
    assert sdpa_backend(model, 2, torch.bfloat16, torch.device("cuda")) != "math"


@cuda
def test_cuda_event_timing(tiny_dit):
    rows = measure_latency(tiny_dit, METHODS[:2], sampler="ddim4", batch_sizes=[1, 4], repeats=2, warmup=1,
                           device="cuda", dtype="bfloat16", tf32=True)
    for row in rows:
        events, wall = row["sampling_event_s"], row["sampling_s"]
        assert 0 < events["median"] <= wall["median"] * 1.05
    assert rows[0]["provenance"]["timer"].endswith("CUDA events")


@cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_branches_on_cuda_equal_eager(tiny_dit, mode):
    """With CUDA graphs (reduce-overhead) the engine must store copies of the outputs it reuses."""
    model = tiny_dit.cuda()
    eager = {name: sample(model, name, params, 2) for _, name, params in METHODS}
    rows = measure_latency(model, METHODS, sampler="ddim4", batch_sizes=[2], repeats=1, warmup=2, compile_mode=mode)
    assert rows[0]["provenance"]["graphs_compiled_while_timing"] == 0
    assert rows[0]["provenance"]["cuda_graphs"] == (mode == "reduce-overhead")
    with compiled_branches(model, mode):
        for _, name, params in METHODS:
            outs = []
            for _ in range(3):  # warm-up, recording, replay
                with attach(model, get_method(name, **params), "ddim4") as engine:
                    engine.clone_stored = mode == "reduce-overhead"
                    gens = sample_generators(0, range(2))
                    outs.append(generate(model, engine.sampler, draw_labels(gens, model.num_classes), gens,
                                         cfg_scale=1.5, step_listener=engine.step_listener).clone())
            for out in outs:
                assert rel_err(out, eager[name]) < 1e-3, name
