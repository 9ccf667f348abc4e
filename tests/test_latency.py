"""Latency harness: interleaved order, warm-up excluded, bookkeeping against a fake clock, tables."""
import json

import pandas as pd
import pytest
import torch

from tokencache.metrics import latency
from tokencache.metrics.flops import forward_macs
from tokencache.metrics.latency import measure_latency, write_latency_table

METHODS = [("full", "full", {}), ("fora2", "fora", {"interval": 2}), ("steps3", "steps", {"num_steps": 3})]
#: fake seconds per image of each method's sampling loop
COST = {"full": 1.0, "fora2": 0.5, "steps3": 0.25}



class FakeClock:
    """A clock that moves only when the sampling loop "runs": by COST[method] × batch."""

    def __init__(self):
        self.now = 0.0
        self.calls = []  # (method label, batch, labels, seeds) in call order

    def __call__(self):
        return self.now

    def generate(self, real):
        def fake(model, sampler, labels, generators, **kwargs):
            ctx = model.cache_context
            label = "fora2" if ctx is not None else ("steps3" if sampler.steps == 3 else "full")
            self.calls.append((label, len(labels), labels.tolist(), [g.initial_seed() for g in generators]))
            out = real(model, sampler, labels, generators, **kwargs)
            self.now += COST[label] * len(labels)
            return out
        return fake


@pytest.fixture
def timed(tiny_dit, monkeypatch):
    """measure_latency on the tiny DiT with the fake clock; returns (rows, events, clock)."""
    clock = FakeClock()
    monkeypatch.setattr(latency, "_clock", clock)
    monkeypatch.setattr(latency, "generate", clock.generate(latency.generate))
    events = []
    rows = measure_latency(tiny_dit, METHODS, sampler="ddim6", batch_sizes=[1, 3], cfg_scale=1.5, repeats=2,
                           warmup=1, device="cpu", on_run=events.append)
    return rows, events, clock


def test_runs_are_interleaved_and_warmup_is_excluded(timed):
    rows, events, clock = timed
    expected = [(r, b, label) for r in range(3) for b in (1, 3) for label, _, _ in METHODS]
    assert [(e["round"], e["batch_size"], e["label"]) for e in events] == expected
    assert [e["warmup"] for e in events] == [r == 0 for r, _, _ in expected]
    decision_round = [(label, b) for b in (1, 3) for label, _, _ in METHODS]  # after the timed rounds
    assert [(c[0], c[1]) for c in clock.calls] == [(label, b) for _, b, label in expected] + decision_round
    assert all(row["repeats"] == 2 and len(row["sampling_s"]["values"]) == 2 for row in rows)
    # the decision round's hooks are timed apart: reference and passthrough methods decide nothing
    by = {(r["label"], r["batch_size"]): r for r in rows}
    assert by[("full", 1)]["decision_s"] == 0 and by[("fora2", 3)]["decision_s"] == 0  # the fake clock never moved
    assert all(r["decision_share"] == 0 for r in rows)


def test_every_method_samples_the_same_noise_and_labels(timed):
    _, _, clock = timed
    for b in (1, 3):
        seen = {(tuple(c[2]), tuple(c[3])) for c in clock.calls if c[1] == b}
        assert len(seen) == 1


def test_speedups_and_realization_ratio(timed, tiny_dit):
    rows, _, _ = timed
    assert [(r["label"], r["batch_size"]) for r in rows] == [(m[0], b) for b in (1, 3) for m in METHODS]
    by = {(r["label"], r["batch_size"]): r for r in rows}
    for b in (1, 3):
        full, fora, steps = by[("full", b)], by[("fora2", b)], by[("steps3", b)]
        assert full["sampling_s"]["median"] == COST["full"] * b
        assert full["speedup"] == 1.0 and full["macs_speedup"] == 1.0 and full["realization_ratio"] == 1.0
        assert fora["speedup"] == pytest.approx(2.0) and steps["speedup"] == pytest.approx(4.0)
        assert full["images_per_s"] == pytest.approx(1.0) and fora["images_per_s"] == pytest.approx(2.0)
        assert full["macs_per_image"] == 6 * 2 * forward_macs(tiny_dit)  # DDIM-6 with CFG
        assert steps["macs_speedup"] == 2.0 and steps["sampler"] == "ddim3" and steps["requested_sampler"] == "ddim6"
        for row in (fora, steps):
            assert row["realization_ratio"] == pytest.approx(row["speedup"] / row["macs_speedup"], rel=1e-12)
            assert row["end_to_end_s"]["median"] >= row["sampling_s"]["median"]


def test_provenance_and_json(timed):
    rows, _, _ = timed
    prov = rows[0]["provenance"]
    for key in ("device", "device_name", "cpu_model", "cpu_threads", "torch", "cuda_version", "driver_version",
                "dtype", "tf32_matmul", "tf32_cudnn", "sdpa_backends", "compile_mode", "git_commit"):
        assert key in prov
    assert prov["compile_mode"] == "none" and prov["dtype"] == "float32" and prov["cpu_threads"] == 1
    assert json.loads(json.dumps(rows)) == rows


def test_write_latency_table(timed, tmp_path):
    rows, _, _ = timed
    write_latency_table(rows, tmp_path / "t.csv", tmp_path / "t.md")
    table = pd.read_csv(tmp_path / "t.csv")
    assert list(table["label"]) == [r["label"] for r in rows]
    assert table["speedup"].tolist() == pytest.approx([r["speedup"] for r in rows])
    assert table["macs_g_per_image"].tolist() == pytest.approx([r["macs_per_image"] / 1e9 for r in rows])
    md = (tmp_path / "t.md").read_text()
    assert "| label" in md and "compile_mode=none" in md


def test_real_clock_run_with_mdt_and_autocast(tiny_mdt):
    rows = measure_latency(tiny_mdt, [("full", "full", {}), ("toca", "toca", {})], sampler="ddim4", batch_sizes=[2],
                           cfg_scale=1.5, repeats=1, warmup=0, dtype="bfloat16")
    assert len(rows) == 2 and rows[0]["speedup"] == 1.0
    assert rows[1]["overhead_macs_per_image"] > 0 and rows[1]["provenance"]["autocast"]
    assert all(r["sampling_s"]["median"] > 0 for r in rows)
    assert rows[0]["memory_kind"].startswith("cpu_")


def test_cpu_memory_falls_back_to_ru_maxrss(tiny_dit, monkeypatch):
    monkeypatch.setattr(latency, "_rss_bytes", lambda: None)
    rows = measure_latency(tiny_dit, [("full", "full", {})], sampler="ddim2", batch_sizes=[1], cfg_scale=1.0,
                           repeats=1, warmup=0)
    assert rows[0]["memory_kind"].startswith("cpu_ru_maxrss") and rows[0]["peak_memory_bytes"] >= 0
    assert rows[0]["macs_per_image"] == 2 * forward_macs(tiny_dit)  # DiT at cfg 1: one row per image


def test_bad_requests_fail_before_timing(tiny_dit):
    with pytest.raises(ValueError, match="unique"):
        measure_latency(tiny_dit, [("a", "full", {}), ("a", "fora", {})], sampler="ddim2")
    with pytest.raises(ValueError, match="unknown method"):
        measure_latency(tiny_dit, [("x", "no-such-method", {})], sampler="ddim2")
    with pytest.raises(ValueError, match="dtype"):
        measure_latency(tiny_dit, [("full", "full", {})], sampler="ddim2", dtype="int8")


def test_no_full_row_gives_no_speedup(tiny_dit):
    rows = measure_latency(tiny_dit, [("fora", "fora", {})], sampler="ddim3", batch_sizes=[1], repeats=1, warmup=0)
    assert rows[0]["speedup"] is None and rows[0]["realization_ratio"] is None and rows[0]["macs_speedup"] > 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_synchronises_and_reports_device_memory(tiny_dit):
    rows = measure_latency(tiny_dit, [("full", "full", {}), ("fora2", "fora", {"interval": 2})], sampler="ddim6",
                           batch_sizes=[1, 4], repeats=2, warmup=1, device="cuda")
    assert all(r["memory_kind"] == "cuda_max_memory_allocated_bytes" and r["peak_memory_bytes"] > 0 for r in rows)
    prov = rows[0]["provenance"]
    assert prov["device"].startswith("cuda") and prov["cuda_version"] and prov["device_memory_bytes"] > 0
    assert [r["speedup"] for r in rows if r["label"] == "full"] == [1.0, 1.0]


def test_cuda_clock_reads_wait_for_the_device(monkeypatch):
    """The synchronisation rule, checked without a GPU (synchronize replaced by a recorder)."""
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    latency._now(torch.device("cuda"))
    latency._now(torch.device("cpu"))
    assert len(synced) == 1


def test_decision_time_is_measured_apart(tiny_dit):
    """The hooks' time is measured in a round of its own: positive for a method that scores tokens."""
    rows = measure_latency(tiny_dit, [("full", "full", {}), ("toca", "toca", {"fresh_ratio": 0.3})], sampler="ddim6",
                           batch_sizes=[2], repeats=1, warmup=0)
    by = {r["label"]: r for r in rows}
    assert 0 < by["toca"]["decision_s"] and 0 < by["toca"]["decision_share"] < 1
    assert by["full"]["decision_share"] < by["toca"]["decision_share"]
    assert len(by["toca"]["sampling_s"]["values"]) == 1  # the decision round is not a timed repeat
    no_round = measure_latency(tiny_dit, [("full", "full", {})], sampler="ddim3", repeats=1, warmup=0,
                               decision_timing=False)
    assert no_round[0]["decision_s"] is None
