"""Atomic writes with the umask's mode, reproducible bytes, checksums, provenance, shipped weights."""
import hashlib
import json
import os
import stat
import time

import numpy as np
import pytest
import torch

from conftest import TINY
from tokencache.io import sha256_file, write_atomic


@pytest.fixture
def umask():
    """Run a test under a given umask (restored afterwards)."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_write_atomic_formats_and_mode_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    arrays = {"arr_0": np.arange(6, dtype=np.uint8).reshape(1, 2, 3, 1), "arr_1": np.array([3])}
    write_atomic(tmp_path / "a.txt", "text ✓")
    write_atomic(tmp_path / "b.bin", b"\x00\x01")
    write_atomic(tmp_path / "c.json", {"x": [1, 2]})
    write_atomic(tmp_path / "d.npz", arrays)
    write_atomic(tmp_path / "e.pt", {"w": torch.ones(2)})
    write_atomic(tmp_path / "sub" / "f.png", format=lambda f: f.write(b"png"))  # a callable; missing folder made
    assert (tmp_path / "a.txt").read_text() == "text ✓" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": [1, 2]}
    with np.load(tmp_path / "d.npz") as data:
        np.testing.assert_array_equal(data["arr_0"], arrays["arr_0"])
    assert torch.equal(torch.load(tmp_path / "e.pt")["w"], torch.ones(2))
    assert (tmp_path / "sub" / "f.png").read_bytes() == b"png"
    for path in ["a.txt", "b.bin", "c.json", "d.npz", "e.pt", "sub/f.png"]:
        assert mode(tmp_path / path) == 0o666 & ~mask, path  # not mkstemp's 0600
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]  # no temporary file left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    write_atomic(tmp_path / "x.json", {"old": True})

    def half_then_fail(f):
        f.write(b'{"new": ')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomic(tmp_path / "x.json", format=half_then_fail)
    assert json.loads((tmp_path / "x.json").read_text()) == {"old": True}
    assert os.listdir(tmp_path) == ["x.json"]


def test_npz_bytes_do_not_depend_on_the_time(tmp_path, monkeypatch):
    """np.savez stamps the current time into its zip entries; write_atomic does not."""
    arrays = {"arr_0": np.zeros((2, 8, 8, 3), np.uint8), "arr_1": np.arange(2)}
    write_atomic(tmp_path / "a.npz", arrays)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 86400 * 400)
    monkeypatch.setattr(time, "localtime", lambda *a: time.gmtime(real() + 86400 * 400))
    write_atomic(tmp_path / "b.npz", arrays)
    assert sha256_file(tmp_path / "a.npz") == sha256_file(tmp_path / "b.npz")


def test_sha256_file(tmp_path):
    (tmp_path / "f").write_bytes(b"abc" * 100_000)
    assert sha256_file(tmp_path / "f", chunk_size=1000) == hashlib.sha256(b"abc" * 100_000).hexdigest()


def test_training_checkpoints_have_no_time_in_them(tmp_path):
    """Two identical trainings write identical bytes (the training time is not stored), EMA-only too."""
    from tokencache.run import build_model
    from tokencache.train import TrainConfig, train_backbone

    digests = {}
    for ema_only in (False, True):
        for k in range(2):
            path = tmp_path / f"m{int(ema_only)}{k}.pt"
            summary = train_backbone(TrainConfig(model="DiT", overrides=TINY, steps=2, batch_size=4), path,
                                     progress=False, ema_only=ema_only)
            assert "seconds" in summary  # the time is reported, not stored
            digests.setdefault(ema_only, set()).add(sha256_file(path))
    assert len(digests[False]) == 1 and len(digests[True]) == 1
    ema = torch.load(tmp_path / "m10.pt", weights_only=False)
    assert set(ema) == {"ema", "args"} and "seconds" not in json.dumps(ema["args"], default=str)
    assert build_model(str(tmp_path / "m10.pt")).config["family"] == "DiT"


# ------------------------------------------------------------------------------------- provenance


def test_provenance_names_the_machine_and_software():
    from tokencache.provenance import available_cpus, provenance

    info = provenance("cpu")
    for key in ("cpu_model", "cpu_capability", "threads", "cpus_available", "torch", "numpy", "tokencache",
                "git_commit", "python", "load_average_1min", "env"):
        assert key in info, key
    assert info["threads"] == torch.get_num_threads() and info["torch"] == torch.__version__
    assert info["numpy"] == np.__version__ and info["cpu_model"]
    assert 1 <= available_cpus() <= (os.cpu_count() or 1)
    json.dumps(info)


def test_provenance_records_isa_settings(monkeypatch):
    from tokencache.provenance import provenance

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert provenance()["env"]["ONEDNN_MAX_CPU_ISA"] == "AVX2"


# ------------------------------------------------------------------------------------- shipped weights


def test_shipped_files_match_their_manifest():
    from tokencache.weights import COMMANDS, manifest, shipped_path

    entries = manifest()
    assert set(entries) == {"DiT-digits", "MDTv2-digits", "digits-evaluator", "digits-reference"} == set(COMMANDS)
    for name, entry in entries.items():
        path = shipped_path(name)
        assert sha256_file(path) == entry["sha256"] and path.stat().st_size == entry["bytes"] < 5_000_000
        assert entry["command"].startswith("tokencache ") and entry["built_with"]["cpu_capability"]
    backbone = torch.load(shipped_path("DiT-digits"), weights_only=False)
    assert set(backbone) == {"ema", "args"}  # EMA weights and the model's settings only


def test_shipped_weights_load_by_name_and_damage_is_one_line(tmp_path, monkeypatch):
    import tokencache.weights as weights
    from tokencache.run import build_model

    model = build_model("shipped:MDTv2-digits")
    assert model.config["name"] == "MDTv2-digits"
    with pytest.raises(ValueError, match="no shipped weights named 'DiT-XL/2'"):
        weights.shipped_path("DiT-XL/2")
    # a damaged install: a copy of the folder with one byte changed
    for entry in weights.manifest().values():
        (tmp_path / entry["file"]).write_bytes((weights.FOLDER / entry["file"]).read_bytes())
    (tmp_path / "manifest.json").write_text(weights.MANIFEST.read_text())
    data = bytearray((tmp_path / "DiT-digits.pt").read_bytes())
    data[-100] ^= 0xFF
    (tmp_path / "DiT-digits.pt").write_bytes(bytes(data))
    monkeypatch.setattr(weights, "FOLDER", tmp_path)
    weights.shipped_path.cache_clear()
    try:
        with pytest.raises(ValueError, match="damaged .* reinstall tokencache"):
            weights.shipped_path("DiT-digits")
    finally:
        weights.shipped_path.cache_clear()


def test_manifest_rebuild_checksums_the_files(tmp_path):
    """`python -m tokencache.weights DIR --manifest-only` writes the same entries as the shipped manifest
    (the files' checksums and the commands that built them)."""
    import shutil

    from tokencache.weights import FOLDER, manifest
    from tokencache.weights.__main__ import build

    for entry in manifest().values():
        shutil.copy(FOLDER / entry["file"], tmp_path / entry["file"])
    rebuilt = build(tmp_path, manifest_only=True)
    for name, entry in manifest().items():
        assert {k: rebuilt[name][k] for k in ("file", "sha256", "bytes", "command")} == \
               {k: entry[k] for k in ("file", "sha256", "bytes", "command")}
    assert json.loads((tmp_path / "manifest.json").read_text()).keys() == manifest().keys()
