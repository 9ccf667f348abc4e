"""The tuning stage's pieces: search-space points, run labels, the front, and `tokencache tune`'s scores.

The scores of a tuned point are checked against what the rest of the suite computes for an
ordinary run of the same setting (``tokencache sample`` → ``run_macs`` and ``fidelity.psnr``), and
the front against an independent sweep.
"""
import json
import random

import numpy as np
import pytest

from tokencache.cache import available_methods, method_class, parse_method_spec, search_points
from tokencache.tuning import front_labels, front_record, pareto_front, point_label, tuning_points


def sweep_front(scores):
    """Non-dominated pairs by a sweep: sort by speed-up (desc), keep a point when its quality is at
    least the best quality of every strictly faster point and it is not beaten by an equally fast one."""
    keep = [False] * len(scores)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i][0], -scores[i][1]))
    best_faster = -np.inf
    i = 0
    while i < len(order):
        speed = scores[order[i]][0]
        group = [j for j in order[i:] if scores[j][0] == speed]
        top = max(scores[j][1] for j in group)
        for j in group:
            keep[j] = scores[j][1] == top and top > best_faster
        best_faster = max(best_faster, top)
        i += len(group)
    return keep


@pytest.mark.parametrize("seed", range(20))
def test_front_matches_a_sweep(seed):
    rng = random.Random(seed)
    scores = [(rng.choice([1.0, 1.5, 2.0, 2.5, 3.0]), rng.choice([20.0, 25.0, 30.0, 35.0])) for _ in range(12)]
    assert pareto_front(scores) == sweep_front(scores)


def test_front_keeps_equal_points_and_drops_dominated():
    assert pareto_front([(2.0, 30.0), (2.0, 30.0), (1.5, 29.0), (3.0, 20.0), (3.0, 19.0)]) == \
        [True, True, False, True, False]


@pytest.mark.parametrize("name", [n for n in available_methods() if method_class(n).search_space])
def test_labels_parse_back_to_their_points(name):
    """A run label FAMILY@k=v,… is read back by the workflow through the method's spec parser."""
    for point in search_points(name):
        label = point_label("family", point)
        family, _, knobs = label.partition("@")
        assert family == "family"
        assert parse_method_spec(f"{name}:{knobs}")[1] == point


def test_fixed_knobs_leave_the_other_axes():
    points = tuning_points("toca", {"interval": 3})
    assert points == [{"fresh_ratio": r} for r in (0.05, 0.1, 0.2, 0.3)]
    assert tuning_points("fora", {"interval": 2}) == [{}]
    assert point_label("fora", {}) == "fora@configured"
    assert tuning_points("full", {}) == [{}]


def _record(family, points, **over):
    base = {"family": family, "method": family, "base": {}, "model": "DiT-digits", "sampler": "ddim20", "seed": 5,
            "start_index": 0, "num_samples": 4, "checkpoint_sha256": "x", "points": points}
    return {**base, **over}


def _scored(labels, scores):
    return [{"label": label, "macs_speedup": s, "psnr_to_full": q, "ssim_to_full": 0.9}
            for label, (s, q) in zip(labels, scores)]


def test_front_record_joins_families_and_refuses_mixed_seeds():
    a = _record("fora", _scored(["fora@interval=2", "fora@interval=6"], [(2.0, 30.0), (2.0, 29.0)]))
    b = _record("toca", _scored(["toca@interval=3,fresh_ratio=0.1"], [(1.5, 31.0)]))
    front = front_record([a, b])
    assert list(front["methods"]) == ["fora", "toca"]
    assert front_labels(front) == ["fora@interval=2", "toca@interval=3,fresh_ratio=0.1"]
    with pytest.raises(ValueError, match="differ in seed"):
        front_record([a, _record("toca", [], seed=6)])


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """`tokencache tune` of FORA on 4 tuning samples of the shipped DiT, DDIM-10, and the reference."""
    from tokencache.cli import main
    from tokencache.weights import shipped_path

    folder = tmp_path_factory.mktemp("tune")
    common = ["--checkpoint", str(shipped_path("DiT-digits")), "--sampler", "ddim10", "--cfg-scale", "3.0",
              "--scale-pow", "0.1", "--clip-denoised", "--seed", "2000", "--num-samples", "4", "--batch-size", "3",
              "--device", "cpu", "--threads", "1", "--quiet"]
    assert main(["sample", *common, "--out", str(folder / "full.npz")]) == 0
    assert main(["tune", *common, "--method", "fora", "--label", "fora-family", "--reference",
                 str(folder / "full.npz"), "--out", str(folder / "fora.json")]) == 0
    return folder, common


def test_tune_scores_equal_an_ordinary_run_of_each_point(tuned):
    """Each point's MACs speed-up and PSNR equal those of `tokencache sample` with that setting."""
    from tokencache.cli import main
    from tokencache.data.npz import load_samples_npz
    from tokencache.metrics.fidelity import psnr
    from tokencache.metrics.flops import run_macs

    folder, common = tuned
    record = json.loads((folder / "fora.json").read_text())
    assert record["family"] == "fora-family" and record["seed"] == 2000 and record["num_samples"] == 4
    assert [p["params"] for p in record["points"]] == search_points("fora")
    full = load_samples_npz(str(folder / "full.npz"))[0]
    for point in record["points"][::2]:
        out = folder / f"{point['label']}.npz"
        assert main(["sample", *common, "--method", point["spec"], "--out", str(out)]) == 0
        assert point["macs_speedup"] == pytest.approx(run_macs(str(out.with_suffix(".json")))["macs_speedup"],
                                                      rel=1e-12)
        assert point["psnr_to_full"] == pytest.approx(psnr(load_samples_npz(str(out))[0], full), rel=1e-12)
    scores = [(p["macs_speedup"], p["psnr_to_full"]) for p in record["points"]]
    assert [p["front"] for p in record["points"]] == sweep_front(scores)


def test_tune_record_is_deterministic_and_keeps_seconds_apart(tuned):
    from tokencache.cli import main

    folder, common = tuned
    again = folder / "again.json"
    assert main(["tune", *common, "--method", "fora", "--label", "fora-family", "--reference",
                 str(folder / "full.npz"), "--out", str(again)]) == 0
    assert again.read_bytes() == (folder / "fora.json").read_bytes()
    assert "seconds" not in again.read_text()
    assert "seconds" in again.with_suffix(".provenance.json").read_text()


def test_tune_refuses_a_reference_of_other_samples(tuned, capsys):
    from tokencache.cli import main

    folder, common = tuned
    other = [*common]
    other[other.index("--seed") + 1] = "2001"
    assert main(["tune", *other, "--method", "fora", "--reference", str(folder / "full.npz"),
                 "--out", str(folder / "x.json")]) == 2
    assert "has seed = 2000, this tuning 2001" in capsys.readouterr().err


def _points(scores):
    return [{"label": f"m@k={i}", "macs_speedup": s, "psnr_to_full": q, "ssim_to_full": 0.9}
            for i, (s, q) in enumerate(scores)]


def test_equal_scores_are_one_point_on_the_front():
    from tokencache.tuning import mark_front

    points = _points([(2.0, 30.0), (2.0, 30.0), (1.5, 29.0), (3.0, 25.0)])
    mark_front(points)
    assert [p["front"] for p in points] == [True, False, False, True]
    assert [p["same_as"] for p in points] == [None, "m@k=0", None, None]


def test_budget_selection_picks_what_a_budget_can_choose():
    """Per speed-up budget the best-PSNR front point at or above it."""
    from tokencache.tuning import evaluated_points, mark_front

    points = _points([(1.2, 40.0), (1.6, 36.0), (2.1, 31.0), (2.6, 29.0), (3.5, 20.0), (1.1, 39.0)])
    mark_front(points)
    assert [p["front"] for p in points] == [True, True, True, True, True, False]
    assert evaluated_points(points, "front", []) == ["m@k=0", "m@k=1", "m@k=2", "m@k=3", "m@k=4"]
    # ≥1.5: k=1 (36 dB); ≥2: k=2 (31 dB); ≥3: k=4; ≥4: none
    assert evaluated_points(points, "budgets", [1.5, 2, 3, 4]) == ["m@k=1", "m@k=2", "m@k=4"]
    assert evaluated_points(points, "budgets", [1.0]) == ["m@k=0"]
    with pytest.raises(ValueError, match="tuning.evaluate"):
        evaluated_points(points, "all", [])


def test_points_a_sampler_cannot_run_are_skipped_and_recorded(tmp_path):
    """Fewer steps than a sampler allows is no point of that sampler's space: skipped, with the reason."""
    from tokencache.cli import main
    from tokencache.weights import shipped_path

    common = ["--checkpoint", str(shipped_path("DiT-digits")), "--sampler", "ddim3", "--cfg-scale", "3.0",
              "--clip-denoised", "--seed", "2000", "--num-samples", "2", "--batch-size", "2", "--device", "cpu",
              "--threads", "1", "--quiet"]
    assert main(["sample", *common, "--out", str(tmp_path / "full.npz")]) == 0
    assert main(["tune", *common, "--method", "steps", "--reference", str(tmp_path / "full.npz"),
                 "--out", str(tmp_path / "steps.json")]) == 0
    record = json.loads((tmp_path / "steps.json").read_text())
    kept = [p["params"]["fraction"] for p in record["points"]]
    skipped = {s["label"]: s["reason"] for s in record.get("skipped", [])}
    assert len(kept) + len(skipped) == len(search_points("steps")) and kept
    assert all("step" in reason for reason in skipped.values())


def test_points_a_model_cannot_run_are_skipped_and_recorded(tmp_path):
    """DeepCache keeping 2 shallow blocks at each end of a 3-block model caches nothing: those points are skipped."""
    from tokencache.cli import main
    from tokencache.models.registry import create_model
    import torch

    torch.manual_seed(0)
    model = create_model("DiT-digits", depth=3)
    checkpoint = tmp_path / "three_blocks.pt"
    torch.save({"model": model.state_dict(), "args": {"model_config": model.config}}, checkpoint)
    common = ["--checkpoint", str(checkpoint), "--sampler", "ddim4", "--cfg-scale", "3.0", "--clip-denoised",
              "--seed", "2000", "--num-samples", "2", "--batch-size", "2", "--device", "cpu", "--threads", "1",
              "--quiet"]
    assert main(["sample", *common, "--out", str(tmp_path / "full.npz")]) == 0
    assert main(["tune", *common, "--method", "deepcache", "--reference", str(tmp_path / "full.npz"),
                 "--out", str(tmp_path / "deepcache.json")]) == 0
    record = json.loads((tmp_path / "deepcache.json").read_text())
    assert {p["params"]["shallow_blocks"] for p in record["points"]} == {1}
    assert [s["label"] for s in record["skipped"]] == [f"deepcache@interval={n},shallow_blocks=2" for n in (2, 3, 4, 5)]
    assert all("shallow_blocks" in s["reason"] for s in record["skipped"])
