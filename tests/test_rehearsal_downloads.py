"""The rehearsal of the download stage: stand-ins in the official formats (tokencache/standins.py),
served by a local mirror on 127.0.0.1 (tokencache/mirror.py), fetched by the download code, and the
faults a real download stage meets (a transfer cut short, a wrong checksum, a sampling shard killed).
No network beyond 127.0.0.1; every loop and wait is bounded."""
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tokencache.cli import main
from tokencache.mirror import DownloadError, MirrorServer, fetch, mirror_source, read_manifest
from tokencache.models.checkpoints import OFFICIAL_WEIGHTS, CheckpointError, download_official
from tokencache.standins import (
    REFERENCE_LAYOUT,
    REFERENCE_NAME,
    STANDIN_CHECKPOINTS,
    VAE_CONFIG,
    VAE_REPO,
    build_standins,
    inception_filename,
    standin_state_dict,
)

ROOT = Path(__file__).resolve().parents[1]
#: the rehearsal config's narrow backbones (config/rehearsal.yaml: backbones.*.model_set)
MODEL_SETS = {"DiT-XL/2": {"hidden_size": 32, "depth": 4, "num_heads": 2},
              "MDTv2-XL/2": {"hidden_size": 32, "depth": 6, "num_heads": 2}}
#: the keys of stabilityai/sd-vae-ft-ema's config.json
OFFICIAL_VAE_KEYS = {"_class_name", "_diffusers_version", "act_fn", "block_out_channels", "down_block_types",
                     "in_channels", "latent_channels", "layers_per_block", "norm_num_groups", "out_channels",
                     "sample_size", "up_block_types"}
REFERENCE_IMAGES = 4

#: building the stand-ins (a module fixture most tests use) and the hub and shard runs take ~50 s in
#: all on a busy 2-core machine: outside the inner loop, `pytest -m "not slow"`
pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    folder = tmp_path_factory.mktemp("internet")
    torch.set_num_threads(1)
    manifest = build_standins(folder, seed=0, model_sets=MODEL_SETS, reference_count=REFERENCE_IMAGES)
    return folder, manifest


@pytest.fixture(scope="module")
def mirror(standins):
    with MirrorServer(standins[0]) as url:
        yield url


def no_part_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".part")]


# ------------------------------------------------------------------------------ the stand-ins


def test_standin_checkpoints_have_the_official_keys_and_load_with_the_preset_and_the_same_overrides(standins):
    from tokencache.models import create_model
    from tokencache.run import build_model

    folder, manifest = standins
    for filename in STANDIN_CHECKPOINTS:
        spec = OFFICIAL_WEIGHTS[filename]
        state = torch.load(folder / filename, map_location="cpu", weights_only=True)  # a plain state dict
        with torch.device("meta"):
            official = create_model(spec.preset, **spec.overrides).state_dict()
        # the official key names in the official order; a narrowed depth has the first blocks' keys only
        assert set(state) <= set(official) and [k for k in official if k in state] == list(state)
        # at the default overrides (the official depth) every official key is there
        assert list(standin_state_dict(filename, 0)) == list(official)
        narrow = create_model(spec.preset, **spec.overrides, **MODEL_SETS[spec.preset]).state_dict()
        assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in narrow.items()}
        # the loader recognises the file by its name and builds its preset with the same overrides
        net = build_model(str(folder / filename), overrides=MODEL_SETS[spec.preset])
        assert type(net).__name__ == spec.preset.split("-")[0]
        assert manifest["checkpoints"][filename]["model_set"] == MODEL_SETS[spec.preset]
        with pytest.raises(CheckpointError, match="fits"):  # without them: the full preset does not fit
            build_model(str(folder / filename))
    mdt = torch.load(folder / "mdt_xl2_v2_ckpt.pt", map_location="cpu", weights_only=True)
    assert "mask_token" in mdt and "decoder_pos_embed" in mdt and any(k.startswith("sideblocks.") for k in mdt)


def test_standin_checkpoint_weights_come_from_the_seed():
    one = standin_state_dict("DiT-XL-2-256x256.pt", 0, MODEL_SETS["DiT-XL/2"])
    again = standin_state_dict("DiT-XL-2-256x256.pt", 0, MODEL_SETS["DiT-XL/2"])
    other = standin_state_dict("DiT-XL-2-256x256.pt", 1, MODEL_SETS["DiT-XL/2"])
    key = "blocks.0.adaLN_modulation.1.weight"  # zero in the official initialisation: random here
    assert torch.equal(one[key], again[key]) and not torch.equal(one[key], other[key])
    assert one[key].abs().sum() > 0


def test_standin_vae_has_the_official_config_keys_and_decodes_32px_latents_to_256px(standins):
    from tokencache.models.vae import decode_latents, load_vae

    folder = standins[0] / VAE_REPO
    config = json.loads((folder / "config.json").read_text())
    assert set(config) == OFFICIAL_VAE_KEYS and config["_class_name"] == "AutoencoderKL"
    assert config == VAE_CONFIG and len(config["block_out_channels"]) == 4
    vae = load_vae(str(folder), "cpu")  # the local folder, as --vae DIR
    images = decode_latents(vae, torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert images.shape == (1, 3, 256, 256) and torch.isfinite(images).all()


def test_standin_inception_weights_load_in_the_feature_extractor(standins):
    from tokencache.metrics.features import extract_features, load_extractor
    from tokencache.standins import _InceptionLayout

    folder = standins[0]
    path = folder / inception_filename()
    assert path.name == "weights-inception-2015-12-05-6726825d.pth"
    state = torch.load(path, map_location="cpu", weights_only=True)
    layout = _InceptionLayout.build().state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in layout.items()}
    extractor = load_extractor("inception", path, "cpu")
    assert extractor.identity["weights_sha256"] == standins[1]["files"][path.name]["sha256"]
    images = np.load(folder / REFERENCE_NAME)["arr_0"][:2]
    feats = extract_features(images, extractor, batch_size=2, progress=False)
    assert feats["pool"].shape == (2, 2048) and feats["spatial"].shape == (2, 2023) and feats["logits"].shape == (2, 1008)
    assert np.isfinite(feats["pool"]).all() and feats["pool"].std() > 0


def test_standin_reference_batch_has_adms_layout_and_statistics_of_its_own_images(standins):
    from tokencache.metrics.features import extract_features

    folder = standins[0]
    with np.load(folder / REFERENCE_NAME) as ref:
        arrays = {k: ref[k] for k in ref.files}
    assert set(arrays) == set(REFERENCE_LAYOUT)
    for key, (dtype, shape) in REFERENCE_LAYOUT.items():
        assert arrays[key].dtype == np.dtype(dtype), key
        assert arrays[key].shape == tuple(REFERENCE_IMAGES if s is None else s for s in shape), key
    assert ((arrays["arr_1"] >= 0) & (arrays["arr_1"] < 1000)).all()
    feats = extract_features(arrays["arr_0"], "inception", weights_path=folder / inception_filename(), device="cpu",
                             batch_size=4, progress=False)
    np.testing.assert_allclose(arrays["mu"], feats["pool"].mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(arrays["sigma_s"], np.cov(feats["spatial"], rowvar=False), rtol=1e-4, atol=1e-6)


def test_two_builds_with_one_seed_are_byte_identical(standins, tmp_path):
    folder, manifest = standins
    again = build_standins(tmp_path, seed=0, model_sets=MODEL_SETS, reference_count=REFERENCE_IMAGES)
    assert again == manifest
    assert (tmp_path / "manifest.json").read_bytes() == (folder / "manifest.json").read_bytes()
    for name in manifest["files"]:
        assert (tmp_path / name).read_bytes() == (folder / name).read_bytes(), name
    assert no_part_files(tmp_path)


def test_the_standins_command_has_help_and_rejects_a_bad_model_set(capsys, tmp_path):
    with pytest.raises(SystemExit) as done:
        main(["standins", "--help"])
    assert done.value.code == 0 and "--model-set" in capsys.readouterr().out
    assert main(["standins", str(tmp_path / "x"), "--model-set", "DiT-XL/2:widht=3", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "widht" in err[0] and "hidden_size" in err[0]
    assert main(["standins", str(tmp_path / "x"), "--model-set", "DiT-B/2:hidden_size=3", "--quiet"]) == 2
    assert "PRESET:key=value" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


# ------------------------------------------------------------------------------ the mirror


def test_downloads_through_the_mirror_are_atomic_and_checked_against_its_manifest(standins, mirror, tmp_path,
                                                                                  monkeypatch, capsys):
    folder, manifest = standins
    # the checkpoint downloader, by argument and by $TOKENCACHE_MIRROR (what the workflow sets)
    target = download_official("DiT-XL-2-256x256.pt", tmp_path / "a", progress=False, base_url=mirror)
    assert target.read_bytes() == (folder / "DiT-XL-2-256x256.pt").read_bytes()
    monkeypatch.setenv("TOKENCACHE_MIRROR", mirror)
    assert main(["download", "mdt_xl2_v2_ckpt.pt", "--dir", str(tmp_path / "b"), "--quiet"]) == 0
    assert (tmp_path / "b" / "mdt_xl2_v2_ckpt.pt").read_bytes() == (folder / "mdt_xl2_v2_ckpt.pt").read_bytes()
    capsys.readouterr()
    # the rules' downloads (download.smk's fetch_atomic): the official URL becomes the mirror's
    ref_url, ref_sha = mirror_source(f"https://example.org/ref_batches/{REFERENCE_NAME}", None)
    assert ref_url == f"{mirror}/{REFERENCE_NAME}" and ref_sha == manifest["files"][REFERENCE_NAME]["sha256"]
    seen = []

    def watching(url, out, progress, name):  # the target appears only once complete and checked
        from tokencache.mirror import stream

        stream(url, out, progress, name)
        seen.append((target2.exists(), [p.name for p in target2.parent.iterdir()]))

    target2 = tmp_path / "c" / REFERENCE_NAME
    assert fetch(ref_url, target2, ref_sha, stream_fn=watching) == ref_sha
    assert seen[0][0] is False and seen[0][1][0].endswith(".part")
    assert target2.read_bytes() == (folder / REFERENCE_NAME).read_bytes() and no_part_files(tmp_path)
    monkeypatch.delenv("TOKENCACHE_MIRROR")
    # without a mirror nothing changes: the official URL and checksum
    url = OFFICIAL_WEIGHTS["DiT-XL-2-256x256.pt"].url
    assert mirror_source(url, None) == (url, None)


def test_the_vae_comes_through_huggingface_hub_pointed_at_the_mirror(standins, mirror, tmp_path, monkeypatch):
    from tokencache.models.vae import download_vae

    manifest = standins[1]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))  # never the user's cache
    digests = download_vae("ema", endpoint=mirror, timeout=240)
    assert digests == {name: manifest["files"][f"{VAE_REPO}/{name}"]["sha256"] for name in digests}
    assert set(digests) == {"config.json", "diffusion_pytorch_model.safetensors"}
    snapshots = list((tmp_path / "hf" / "models--stabilityai--sd-vae-ft-ema" / "snapshots").iterdir())
    assert len(snapshots) == 1 and (snapshots[0] / "config.json").is_file()
    # the jobs then load it offline from that cache, by its repository name
    code = ("import torch; from tokencache.models.vae import load_vae, decode_latents; "
            "print(tuple(decode_latents(load_vae('ema'), torch.zeros(1, 4, 32, 32)).shape))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert done.returncode == 0 and "(1, 3, 256, 256)" in done.stdout, done.stderr[-2000:]


class _Faulty(http.server.BaseHTTPRequestHandler):
    """Serves ``files`` (name → bytes); the first ``cut`` GETs of a non-manifest file announce the whole
    length and send a tenth of it, then close: a transfer cut short."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        name = self.path.lstrip("/")
        body = self.server.files.get(name)
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.server.gets.append(name)
        cut = name != "manifest.json" and self.server.cut > 0
        self.server.cut -= cut
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body[: len(body) // 10] if cut else body)
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def faulty():
    """A server on 127.0.0.1 with a payload, a manifest and a configurable number of cut transfers."""
    payload = bytes(range(256)) * 400
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Faulty)
    server.daemon_threads = True
    name = "DiT-XL-2-256x256.pt"
    server.files = {name: payload,
                    "manifest.json": json.dumps({"files": {name: {"sha256": hashlib.sha256(payload).hexdigest(),
                                                                 "size": len(payload)}}}).encode()}
    server.gets, server.cut = [], 0
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}", name, payload
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def test_a_transfer_cut_short_is_retried(faulty, tmp_path, monkeypatch):
    import tokencache.mirror as mirror_module

    monkeypatch.setattr(mirror_module, "RETRY_PAUSE_S", 0.01)
    server, url, name, payload = faulty
    server.cut = 1  # fails once, then succeeds
    target = tmp_path / name
    assert fetch(f"{url}/{name}", target, hashlib.sha256(payload).hexdigest()) == hashlib.sha256(payload).hexdigest()
    assert target.read_bytes() == payload and server.gets == [name, name] and no_part_files(tmp_path)


def test_a_transfer_cut_short_every_time_leaves_no_file_and_fails_in_one_line_naming_the_url(faulty, tmp_path,
                                                                                           monkeypatch, capsys):
    import tokencache.mirror as mirror_module

    monkeypatch.setattr(mirror_module, "RETRY_PAUSE_S", 0.01)
    server, url, name, payload = faulty
    server.cut = 100
    with pytest.raises(DownloadError) as err:
        fetch(f"{url}/{name}", tmp_path / "x" / name, attempts=2)
    message = str(err.value)
    assert "\n" not in message and f"{url}/{name}" in message and "cut short" in message and "tried 2 times" in message
    assert server.gets == [name, name] and list((tmp_path / "x").iterdir()) == []
    # the same through `tokencache download --base-url`: exit 2, one line, no file
    assert main(["download", name, "--dir", str(tmp_path / "y"), "--base-url", url, "--quiet"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and f"{url}/{name}" in lines[0] and "cut short" in lines[0]
    assert list((tmp_path / "y").iterdir()) == []


def test_the_download_rules_retry_and_run_on_the_submit_host():
    """Snakemake's `retries:` retries a failed download job; the downloads are local rules (where the
    rehearsal's server is). Read off download.smk, the rules' own text."""
    text = (ROOT / "workflow/rules/download.smk").read_text()
    for rule in ("download_checkpoint", "download_vae", "download_reference", "download_inception"):
        body = re.search(rf"rule {rule}:\n(.*?)(?=\n\s*rule |\Z)", text, re.S).group(1)
        assert re.search(r"retries: [1-9]", body), rule
        assert re.search(rf"localrules:[^:]*\b{rule}\b", text, re.S), rule


def test_a_wrong_sha256_in_the_manifest_fails_before_the_file_has_its_name(standins, tmp_path):
    folder = standins[0]
    bad = tmp_path / "bad-internet"
    bad.mkdir()
    for name in ("DiT-XL-2-256x256.pt", REFERENCE_NAME):
        os.link(folder / name, bad / name) if os.stat(folder).st_dev == os.stat(bad).st_dev else shutil.copy(folder / name, bad / name)
    wrong = "0" * 64
    (bad / "manifest.json").write_text(json.dumps({"files": {n: {"sha256": wrong, "size": 1} for n in os.listdir(bad)
                                                             if n != "manifest.json"}}))
    with MirrorServer(bad) as url:
        assert read_manifest(url)["files"]["DiT-XL-2-256x256.pt"]["sha256"] == wrong
        with pytest.raises(CheckpointError) as err:
            download_official("DiT-XL-2-256x256.pt", tmp_path / "dl", progress=False, base_url=url)
        assert f"{url}/DiT-XL-2-256x256.pt" in str(err.value) and "sha256" in str(err.value)
        assert "\n" not in str(err.value)
        src, sha = mirror_source(f"https://example.org/{REFERENCE_NAME}", None, url)
        with pytest.raises(DownloadError, match="does not match the expected 0{64}"):
            fetch(src, tmp_path / "dl" / REFERENCE_NAME, sha)
    assert list((tmp_path / "dl").iterdir()) == []  # nothing under a final name, nothing half-written


def test_a_wrong_sha256_of_the_vae_fails_and_names_the_file(standins, tmp_path, monkeypatch):
    from tokencache.models.vae import download_vae

    folder, manifest = standins
    bad = tmp_path / "bad-internet"
    shutil.copytree(folder / VAE_REPO, bad / VAE_REPO)
    files = dict(manifest["files"])
    files[f"{VAE_REPO}/diffusion_pytorch_model.safetensors"] = {"sha256": "f" * 64, "size": 1}
    (bad / "manifest.json").write_text(json.dumps({"files": files}))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with MirrorServer(bad) as url:
        with pytest.raises(RuntimeError, match=r"diffusion_pytorch_model.safetensors: sha256 .* does not match"):
            download_vae("ema", endpoint=url, timeout=240)


# ------------------------------------------------------------------------------ a killed shard


def test_a_sampling_shard_killed_mid_run_is_redone_and_the_merge_is_byte_identical(tmp_path):
    from tokencache.run import SampleRequest, merge_shards, run_sampling

    shards = [(0, 12), (12, 8)]
    common = dict(checkpoint="shipped:DiT-digits", sampler="ddim10", cfg_scale=3.0, batch_size=4, seed=0,
                  device="cpu")

    def sample(folder, start, count):
        out = folder / f"{start}_{count}.npz"
        run_sampling(SampleRequest(out=str(out), num_samples=count, start_index=start, **common), progress=False)
        return str(out)

    clean = tmp_path / "clean"
    merge_shards([sample(clean, s, c) for s, c in shards], str(clean / "samples.npz"))

    killed = tmp_path / "killed"
    killed.mkdir()
    out = killed / "0_12.npz"
    proc = subprocess.Popen([sys.executable, "-m", "tokencache", "sample", "--checkpoint", "shipped:DiT-digits",
                             "--sampler", "ddim10", "--cfg-scale", "3", "--num-samples", "400", "--batch-size", "4",
                             "--seed", "0", "--threads", "1", "--device", "cpu", "--out", str(out)],
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    seen, deadline = "", time.time() + 120
    while "4/400" not in seen and time.time() < deadline and proc.poll() is None:  # mid-run: a batch is done
        seen += proc.stderr.read(1)
    assert "4/400" in seen, seen[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert os.listdir(killed) == []  # no shard, no JSON, no temporary file: the job is simply redone
    merge_shards([sample(killed, s, c) for s, c in shards], str(killed / "samples.npz"))
    assert (killed / "samples.npz").read_bytes() == (clean / "samples.npz").read_bytes()
