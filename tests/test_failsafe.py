"""Every mistake in input or environment: one line naming the fix, exit 2, caught before the long work,
nothing half-written, outputs readable by the group/others as the umask allows."""
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY
from tokencache.cli import main
from tokencache.train import TrainConfig, train_backbone

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    train_backbone(TrainConfig(model="DiT", overrides=TINY, steps=2, batch_size=4), path, progress=False, ema_only=True)
    return str(path)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """A real digits sample file (labels 0-9) and the shipped evaluator and reference."""
    from tokencache.data.digits import digits_to_uint8, load_digits_dataset
    from tokencache.data.npz import save_samples_npz

    folder = tmp_path_factory.mktemp("samples")
    digits = load_digits_dataset("test")
    save_samples_npz(folder / "s.npz", digits_to_uint8(digits.images[:40]), digits.labels[:40].numpy())
    return folder / "s.npz"


def one_line_error(capsys, argv, fragment, code=2):
    """Run the CLI in-process; the error is exactly one stderr line containing ``fragment``."""
    assert main([*argv, "--quiet"]) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("tokencache") and fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody can write into (root: the immutable attribute; skipped where that is not allowed)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() == 0:
        done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip("running as root without chattr +i: no read-only folder to test with")
        yield folder
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


# ------------------------------------------------------------------------------------- outputs


def test_read_only_output_folder_fails_before_sampling(capsys, tiny_ckpt, read_only_dir):
    line = one_line_error(capsys, ["sample", "--checkpoint", tiny_ckpt, "--out", str(read_only_dir / "s.npz")],
                          "cannot write in")
    assert "choose another --out" in line and not os.listdir(read_only_dir)


def test_evaluate_into_read_only_folder_fails_before_computing(capsys, samples, read_only_dir, monkeypatch):
    import tokencache.metrics.quality as quality

    monkeypatch.setattr(quality, "_quality", lambda *a, **k: pytest.fail("computed before checking --out"))
    one_line_error(capsys, ["evaluate", str(samples), "--reference", "shipped", "--features", "digits",
                            "--weights", "shipped", "--out", str(read_only_dir / "m.json")], "cannot write in")


def test_out_is_an_existing_folder(capsys, tiny_ckpt, tmp_path, samples):
    one_line_error(capsys, ["sample", "--checkpoint", tiny_ckpt, "--out", str(tmp_path)], "is a folder")
    one_line_error(capsys, ["evaluate", str(samples), "--reference", "shipped", "--features", "digits",
                            "--weights", "shipped", "--out", str(tmp_path)], "is a folder")


def test_full_disk_is_found_before_sampling(capsys, tiny_ckpt, tmp_path, monkeypatch):
    import tokencache.checks as checks
    import tokencache.run as run

    monkeypatch.setattr(checks.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 10**6, 10**6))
    monkeypatch.setattr(run, "generate", lambda *a, **k: pytest.fail("sampled before the disk check"))
    line = one_line_error(capsys, ["sample", "--checkpoint", tiny_ckpt, "--num-samples", "5000", "--sampler", "ddim5",
                                   "--out", str(tmp_path / "s.npz")], "are free on that disk")
    assert "1.0 MB" in line and not (tmp_path / "s.npz").exists()


def test_disk_full_while_writing_leaves_nothing(capsys, tiny_ckpt, tmp_path, monkeypatch):
    import tokencache.io as tio

    def no_space(f, arrays):
        f.write(b"PK partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tio, "_write_npz", no_space)
    line = one_line_error(capsys, ["sample", "--checkpoint", tiny_ckpt, "--num-samples", "2", "--sampler", "ddim3",
                                   "--out", str(tmp_path / "s.npz")], "No space left on device")
    assert "s.npz" in line and "free disk space" in line
    assert os.listdir(tmp_path) == []  # neither the npz, nor its JSON, nor a temporary file


def test_evaluate_out_into_a_missing_folder_is_created(capsys, samples, tmp_path):
    out = tmp_path / "new" / "deeper" / "m.json"
    assert main(["evaluate", str(samples), "--reference", "shipped", "--features", "digits", "--weights", "shipped",
                 "--bootstrap", "20", "--out", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["num_samples"] == 40
    assert (out.parent / "m.bootstrap.npz").is_file()


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_outputs_honour_the_umask(tmp_path, tiny_ckpt, samples, mask):
    saved = os.umask(mask)
    try:
        assert main(["sample", "--checkpoint", tiny_ckpt, "--num-samples", "2", "--sampler", "ddim3", "--quiet",
                     "--out", str(tmp_path / "s.npz")]) == 0
        assert main(["train-backbone", "--model", "DiT", "--model-set", "input_size=8", "patch_size=2", "in_channels=1",
                     "num_classes=10", "hidden_size=32", "depth=2", "num_heads=2", "--steps", "1", "--batch-size", "2",
                     "--quiet", "--out", str(tmp_path / "m.pt")]) == 0
        assert main(["reference", "--weights", "shipped", "--quiet", "--out", str(tmp_path / "ref.npz")]) == 0
    finally:
        os.umask(saved)
    for name in ("s.npz", "s.json", "m.pt", "m.log.jsonl", "ref.npz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name


# ------------------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("content, fragment", [
    (b"", "is empty (0 bytes)"),
    (None, "single .npy array"),
    (os.urandom(4096), "not an npz file (no zip header)"),
    ("truncated", "truncated or damaged"),
], ids=["empty", "npy", "random-bytes", "truncated"])
def test_evaluate_bad_sample_files(capsys, tmp_path, samples, content, fragment):
    path = tmp_path / "bad.npz"
    if content is None:
        with open(path, "wb") as f:
            np.save(f, np.zeros((2, 8, 8, 3), np.uint8))
    elif content == "truncated":
        path.write_bytes(samples.read_bytes()[:700])
    else:
        path.write_bytes(content)
    line = one_line_error(capsys, ["evaluate", str(path), "--reference", "shipped", "--features", "digits",
                                   "--weights", "shipped"], fragment)
    assert "allow_pickle" not in line


def test_evaluate_missing_file(capsys, tmp_path):
    one_line_error(capsys, ["evaluate", str(tmp_path / "none.npz"), "--reference", "shipped", "--features", "digits",
                            "--weights", "shipped"], "does not exist")


@pytest.mark.parametrize("label", [99, -1])
def test_evaluate_rejects_labels_outside_the_classes(capsys, tmp_path, samples, label):
    from tokencache.data.npz import load_samples_npz, save_samples_npz

    images, labels = load_samples_npz(samples)
    labels = labels.copy()
    labels[3] = label
    save_samples_npz(tmp_path / "s.npz", images, labels)
    one_line_error(capsys, ["evaluate", str(tmp_path / "s.npz"), "--reference", "shipped", "--features", "digits",
                            "--weights", "shipped"], f"label {label} in arr_1 is outside the evaluator's 10 classes")


@pytest.mark.parametrize("argv, fragment", [
    (["sample", "--seed", "-1"], "--seed must be ≥ 0, got -1"),
    (["sample", "--cfg-scale", "inf"], "--cfg-scale must be a finite number"),
    (["sample", "--cfg-scale", "nan"], "--cfg-scale must be a finite number"),
    (["sample", "--num-samples", "0"], "--num-samples must be ≥ 1"),
    (["sample", "--threads", "0"], "--threads must be ≥ 1"),
    (["sample", "--sampler", "ddim1"], "at least 2 steps"),
    (["sample", "--sampler", "ddim0"], "unknown sampler"),
    (["sample", "--sampler", "foo"], "unknown sampler"),
    (["sample", "--method", "steps:num_steps=1"], "at least 2 steps"),
    (["evaluate", "--batch-size", "0"], "--batch-size must be ≥ 1, got 0"),
    (["evaluate", "--bootstrap", "1"], "--bootstrap must be 0"),
    (["train-backbone", "--lr", "inf"], "--lr must be a finite number"),
    (["sample", "--seed", "x"], "argument --seed: invalid int value"),
], ids=lambda v: "_".join(v) if isinstance(v, list) else None)
def test_bad_arguments_are_one_line_before_any_work(capsys, tmp_path, tiny_ckpt, samples, argv, fragment, monkeypatch):
    import tokencache.run as run

    monkeypatch.setattr(run, "generate", lambda *a, **k: pytest.fail("sampled despite a bad argument"))
    command, rest = argv[0], argv[1:]
    required = {"sample": ["--checkpoint", tiny_ckpt, "--out", str(tmp_path / "s.npz")],
                "evaluate": [str(samples), "--reference", "shipped", "--features", "digits", "--weights", "shipped"],
                "train-backbone": ["--out", str(tmp_path / "m.pt")]}[command]
    try:
        one_line_error(capsys, [command, *required, *rest], fragment)
    except SystemExit as exit_info:  # argparse's own errors exit from the parser, in one line too
        assert exit_info.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0] and "--help" in lines[0]
    assert not [p for p in tmp_path.iterdir() if p.suffix in (".npz", ".pt", ".json", ".jsonl")]


def test_bad_training_arguments_leave_no_log(capsys, tmp_path, tiny_ckpt):
    one_line_error(capsys, ["train-backbone", "--model", "DiT-XL/2", "--out", str(tmp_path / "m.pt")],
                   "the digits testbed needs")
    one_line_error(capsys, ["calibrate", "--method", "l2c", "--checkpoint", str(tmp_path / "none.pt"), "--out",
                            str(tmp_path / "r.pt")], "does not exist")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------- merge, quiet, threads


def test_merge_writes_json_that_flops_reads(capsys, tmp_path, tiny_ckpt):
    for start, count in ((0, 2), (2, 1)):
        assert main(["sample", "--checkpoint", tiny_ckpt, "--sampler", "ddim4", "--method", "fora:interval=2",
                     "--start-index", str(start), "--num-samples", str(count), "--quiet",
                     "--out", str(tmp_path / f"s{start}.npz")]) == 0
    assert main(["merge", str(tmp_path / "s0.npz"), str(tmp_path / "s2.npz"), "--out", str(tmp_path / "all.npz")]) == 0
    merged = json.loads((tmp_path / "all.json").read_text())
    assert merged["num_samples"] == 3 and merged["provenance"]["cpu_model"]
    capsys.readouterr()
    assert main(["flops", "--run", str(tmp_path / "all.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["macs_speedup"] > 1


def test_quiet_means_no_progress_bars(samples, capsys):
    base = ["evaluate", str(samples), "--reference", "shipped", "--features", "digits", "--weights", "shipped",
            "--bootstrap", "20", "--threads", "1"]
    assert main(base + ["--quiet"]) == 0
    quiet = capsys.readouterr().err
    assert main(base) == 0
    loud = capsys.readouterr().err
    assert quiet == "" and "digits features" in loud


def test_threads_default_to_the_idle_cpus(monkeypatch, tiny_ckpt, tmp_path):
    import torch

    import tokencache.provenance as provenance

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(provenance, "idle_cpus", lambda: 3)
    assert main(["sample", "--checkpoint", tiny_ckpt, "--num-samples", "1", "--sampler", "ddim2", "--quiet",
                 "--out", str(tmp_path / "s.npz")]) == 0
    assert torch.get_num_threads() == 3
    from threadpoolctl import threadpool_info

    assert {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"} == {3}
    assert json.loads((tmp_path / "s.json").read_text())["provenance"]["threads"] == 3
    assert main(["sample", "--checkpoint", tiny_ckpt, "--num-samples", "1", "--sampler", "ddim2", "--quiet",
                 "--threads", "1", "--out", str(tmp_path / "s.npz")]) == 0
    assert torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # a scheduler's (or the workflow's) choice is kept
    assert main(["sample", "--checkpoint", tiny_ckpt, "--num-samples", "1", "--sampler", "ddim2", "--quiet",
                 "--out", str(tmp_path / "s.npz")]) == 0
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("available, ticks, idle", [
    (4, [(100, 400), (180, 480)], 4),   # every CPU idle through the window
    (4, [(100, 400), (140, 480)], 2),   # half of the time idle: two CPUs busy
    (4, [(100, 400), (100, 480)], 1),   # all busy: still one thread
    (2, [(100, 400), (180, 480)], 2),   # the affinity mask caps it
])
def test_idle_cpus_counts_the_cpus_no_one_is_using(monkeypatch, available, ticks, idle):
    """The default thread count: the share of idle time of all CPUs over a short window, times the
    CPU count, capped by what this process may use, at least one."""
    import tokencache.provenance as provenance

    readings = iter(ticks)
    monkeypatch.setattr(provenance, "cpu_times", lambda: next(readings))
    monkeypatch.setattr(provenance, "available_cpus", lambda: available)
    monkeypatch.setattr(provenance.os, "cpu_count", lambda: 4)
    assert provenance.idle_cpus(window_s=0) == idle


def test_idle_cpus_sees_a_busy_process():
    """On this machine: a spinning process takes one CPU away from the default (needs ≥ 2 CPUs)."""
    import tokencache.provenance as provenance

    if provenance.available_cpus() < 2 or not os.path.exists("/proc/stat"):
        pytest.skip("needs two CPUs and /proc/stat")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        busy = min(provenance.idle_cpus(window_s=0.5) for _ in range(3))
    finally:
        spinner.kill()
        spinner.wait()
    assert busy <= provenance.available_cpus() - 1


def test_every_compute_command_takes_threads():
    from tokencache.cli import COMPUTE_COMMANDS, build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    for name, parser in commands.items():
        flags = {opt for action in parser._actions for opt in action.option_strings}
        assert ("--threads" in flags) == (name in COMPUTE_COMMANDS), name


def test_latency_records_the_load_and_warns_when_busy(capsys, tmp_path, monkeypatch):
    import tokencache.provenance as provenance

    monkeypatch.setattr(provenance, "load_average", lambda: 7.5)
    assert main(["latency", "--model", "DiT-digits", "--sampler", "ddim3", "--repeats", "2", "--warmup", "0",
                 "--threads", "1", "--quiet", "--out", str(tmp_path / "lat.json")]) == 0
    err = capsys.readouterr().err
    assert "warning: the machine is busy (1-minute load average 7.50" in err
    machine = json.loads((tmp_path / "lat.json").read_text())["machine"]
    assert machine["load_average_before"] == 7.5 and machine["busy_before"] and "noisy_rows" in machine


# ------------------------------------------------------------------------------------- interrupts


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_ends_on_its_own_line_and_leaves_no_file(tmp_path, sig):
    out = tmp_path / "s.npz"
    # SIGINT as a foreground job in a terminal has it: a shell that starts the tests in the background
    # leaves SIGINT ignored, the child inherits that, and Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen([sys.executable, "-m", "tokencache.cli", "sample", "--checkpoint", "shipped:DiT-digits",
                             "--sampler", "ddim20", "--cfg-scale", "3", "--num-samples", "400", "--batch-size", "8",
                             "--threads", "1", "--out", str(out)], stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = ""
    deadline = time.time() + 60
    while "8/400" not in seen and time.time() < deadline:  # mid-run: the first batch is done, the bar drawn
        seen += proc.stderr.read(1)
    proc.send_signal(sig)
    rest = proc.communicate(timeout=60)[1]
    err = seen + rest
    assert proc.returncode == 130
    assert err.endswith("\ntokencache: interrupted\n")  # on its own line, not inside the bar
    assert os.listdir(tmp_path) == []
