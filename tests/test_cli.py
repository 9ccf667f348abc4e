"""The command line: help everywhere, one-line errors, sampling end to end."""
import json
import subprocess
import sys

import numpy as np
import pytest

from tokencache.cli import build_parser, main, parse_overrides
from tokencache.train import TrainConfig, train_backbone

from conftest import TINY


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"models", "download", "train-backbone", "sample"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert "usage: tokencache" in capsys.readouterr().out


def test_overrides_are_typed():
    assert parse_overrides(["a=1", "b=0.5", "c=true", "d=none", "e=x"]) == {"a": 1, "b": 0.5, "c": True, "d": None, "e": "x"}


def test_models_json(capsys):
    assert main(["models", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["presets"]["DiT-XL/2"]["depth"] == 28 and "MDTv2-digits" in out["presets"]


@pytest.mark.parametrize("argv, fragment", [
    (["sample", "--checkpoint", "nope.pt", "--out", "x.npz"], "does not exist"),
    (["train-backbone", "--model", "DiT-XXL/2", "--out", "x.pt", "--steps", "1"], "unknown model"),
    (["train-backbone", "--steps", "0", "--out", "x.pt"], "--steps"),
    (["train-backbone", "--grad-clip", "-1", "--out", "x.pt"], "--grad-clip"),
])
def test_user_errors_are_one_line(capsys, argv, fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert not list(tmp_path.iterdir())  # nothing written before the error
    err = capsys.readouterr().err.strip()
    assert err.startswith("tokencache: error:") and fragment in err and "\n" not in err


@pytest.mark.slow
def test_sample_end_to_end(tmp_path):
    ckpt = tmp_path / "tiny.pt"
    train_backbone(TrainConfig(model="DiT", overrides=TINY, steps=2, batch_size=4), ckpt, progress=False)
    out = tmp_path / "s.npz"
    proc = subprocess.run([sys.executable, "-m", "tokencache.cli", "sample", "--checkpoint", str(ckpt),
                           "--sampler", "ddim5", "--num-samples", "5", "--batch-size", "2", "--out", str(out),
                           "--quiet", "--json", "--clip-denoised", "--device", "cpu"],
                          capture_output=True, text=True, check=True)
    summary = json.loads(proc.stdout)
    data = np.load(out)
    assert data["arr_0"].shape == (5, 8, 8, 3) and data["arr_0"].dtype == np.uint8
    assert data["arr_1"].shape == (5,) and summary["num_samples"] == 5
    assert json.loads(out.with_suffix(".json").read_text())["request"]["sampler"] == "ddim5"
    # a bad sampler name is refused before any work
    bad = subprocess.run([sys.executable, "-m", "tokencache.cli", "sample", "--checkpoint", str(ckpt),
                          "--sampler", "euler", "--out", str(tmp_path / "b.npz")], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown sampler" in bad.stderr


def test_flops_command_reports_the_paper_number(capsys):
    assert main(["flops", "--model", "DiT-XL/2", "--analytic-only", "--json"]) == 0
    macs = json.loads(capsys.readouterr().out)["analytic_macs"]
    assert abs(macs / 118.6e9 - 1) < 0.005  # the DiT paper's 118.6 "Gflops" are MACs


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "tokencache", "methods", "--json"], capture_output=True, text=True,
                          check=True)
    assert {"full", "fora", "toca"} <= {m["name"] for m in json.loads(proc.stdout)}


def test_calibrate_command_writes_a_method_file(tmp_path, capsys):
    from tokencache.cache import get_method, load_calibration
    from tokencache.run import build_model

    ckpt = tmp_path / "tiny.pt"
    train_backbone(TrainConfig(model="DiT", overrides=TINY, steps=2, batch_size=4), ckpt, progress=False)
    out = tmp_path / "router.pt"
    assert main(["calibrate", "--method", "l2c", "--checkpoint", str(ckpt), "--sampler", "ddim6", "--cfg-scale", "2",
                 "--settings", "steps=3", "lr=0.1", "num_samples=2", "batch_size=2", "--out", str(out), "--quiet",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["file"] == str(out) and summary["steps"] == 3 and summary["lr"] == 0.1
    assert load_calibration(get_method("l2c"), out, build_model(str(ckpt)), "ddim6")["logits"].shape == (6, 4, 2)
    assert len(out.with_suffix(".log.jsonl").read_text().splitlines()) == 3
    for argv, fragment in ((["--method", "fora"], "fora has nothing to calibrate"),
                           (["--method", "l2c", "--settings", "steps=many"], "steps must be int, got 'many'"),
                           (["--method", "l2c", "--settings", "stepz=2"], "unknown parameter 'stepz'")):
        assert main(["calibrate", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x.pt"), *argv]) == 2
        assert fragment in capsys.readouterr().err


def test_sample_with_a_method_records_counts(tmp_path):
    ckpt = tmp_path / "tiny.pt"
    train_backbone(TrainConfig(model="DiT", overrides=TINY, steps=2, batch_size=4), ckpt, progress=False)
    out = tmp_path / "f.npz"
    assert main(["sample", "--checkpoint", str(ckpt), "--sampler", "ddim9", "--num-samples", "3", "--quiet",
                 "--method", "fora:interval=3", "--out", str(out), "--device", "cpu"]) == 0
    cache = json.loads(out.with_suffix(".json").read_text())["cache"]
    counts = np.asarray(cache["counts_per_sample"])
    assert cache["method"] == "fora" and cache["full_steps"] == 4  # i = 8 (first), 6, 3, 0
    assert counts.shape == (9, TINY["depth"], 2) and (counts[[0, 2, 5, 8]] == 16).all()
    assert counts[[1, 3, 4, 6, 7]].sum() == 0
