"""The user's errors are one line; a bug keeps its traceback.

``tokencache.errors.UserError`` marks what the user gave or asked for wrong (a checkpoint, a
calibration file, a plugin, a download, a device); the CLI prints those, and bad values, missing
files, OS errors and running out of memory, as one line with exit 2. A RuntimeError from the
engine, a method or torch is a bug: it is not caught, so Python prints its traceback (exit 1).
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokencache.cache import PluginError
from tokencache.cache.calibration import CalibrationError
from tokencache.cli import error_line, is_users_error, main
from tokencache.errors import DeviceUnavailable, UserError
from tokencache.metrics.features import InceptionWeightsUnavailable
from tokencache.mirror import DownloadError
from tokencache.models.checkpoints import CheckpointError
from tokencache.models.vae import VAEUnavailable

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ["sample", "--checkpoint", "shipped:DiT-digits", "--sampler", "ddim2", "--cfg-scale", "3", "--clip-denoised",
          "--method", "fora", "--num-samples", "2", "--threads", "1", "--quiet"]


@pytest.mark.parametrize("cls, builtin", [
    (CheckpointError, ValueError), (CalibrationError, ValueError), (PluginError, RuntimeError),
    (DownloadError, RuntimeError), (InceptionWeightsUnavailable, RuntimeError), (VAEUnavailable, RuntimeError),
    (DeviceUnavailable, RuntimeError)])
def test_the_users_errors_are_user_errors_and_keep_their_builtin_base(cls, builtin):
    """``except ValueError`` / ``except RuntimeError`` written before UserError existed still catch them."""
    assert issubclass(cls, UserError) and issubclass(cls, builtin)
    assert is_users_error(cls("x"))


@pytest.mark.parametrize("exc, users", [
    (RuntimeError("a bug"), False), (AssertionError(), False), (TypeError("x"), False), (KeyError("k"), False),
    (ValueError("bad --seed"), True), (FileNotFoundError("no file"), True), (PermissionError(13, "denied"), True),
    (MemoryError(), True), (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), True)])
def test_which_errors_are_the_users(exc, users):
    assert is_users_error(exc) is users


def test_running_out_of_device_memory_says_what_to_do():
    assert error_line(torch.OutOfMemoryError("CUDA out of memory. Tried …")) == \
        "out of memory: lower --batch-size (or free memory)"


def test_a_missing_plugin_folder_is_one_line(capsys, tmp_path):
    assert main(["methods", "--plugins", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("tokencache: error: method plugin folder") and "does not exist" in err


def test_cuda_without_cuda_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*SAMPLE, "--device", "cuda", "--out", str(tmp_path / "s.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA device" in err and "--device cpu" in err
    assert not (tmp_path / "s.npz").exists()


def test_a_runtime_error_inside_the_engine_is_not_swallowed(tmp_path, monkeypatch):
    from tokencache.cache import engine

    def broken(self, step, num_steps):
        raise RuntimeError("engine bug planted by the test")

    monkeypatch.setattr(engine.CacheEngine, "step_listener", broken)
    with pytest.raises(RuntimeError, match="engine bug planted"):
        main([*SAMPLE, "--out", str(tmp_path / "s.npz")])
    assert not (tmp_path / "s.npz").exists()


def test_a_runtime_error_inside_the_engine_prints_its_traceback(tmp_path):
    """The real entry point, in a process of its own: the traceback reaches the terminal, exit 1."""
    code = ("import sys\n"
            "from tokencache.cache import engine\n"
            "def broken(self, step, num_steps):\n"
            "    raise RuntimeError('engine bug planted by the test')\n"
            "engine.CacheEngine.step_listener = broken\n"
            "from tokencache.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", code, *SAMPLE, "--out", str(tmp_path / "s.npz")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr
    assert "Traceback (most recent call last)" in done.stderr
    assert done.stderr.rstrip().endswith("RuntimeError: engine bug planted by the test"), done.stderr[-2000:]
    assert "tokencache: error:" not in done.stderr and not (tmp_path / "s.npz").exists()
