"""Checkpoint loading, mismatch messages, preset suggestions and the atomic download."""
import argparse
import os

import pytest
import torch

import tokencache  # noqa: F401  (torchvision import fix before anything imports timm)
from tokencache.models import CheckpointError, create_model, download_official, load_checkpoint, read_checkpoint
from tokencache.models import checkpoints as ckpt
from tokencache.models.checkpoints import OFFICIAL_WEIGHTS, extract_state_dict, suggest_preset

TINY = dict(input_size=8, patch_size=2, in_channels=4, num_classes=10, hidden_size=32, depth=2, num_heads=2)



def tiny(family="DiT", seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(TINY, **({"decode_layer": 1} if family != "DiT" else {}))
    args.update(kw)
    model = create_model(family, **args)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def same_weights(a: torch.nn.Module, b) -> bool:
    sb = b if isinstance(b, dict) else b.state_dict()
    sa = a.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize("family", ["DiT", "MDT", "MDTv2"])
def test_plain_state_dict_file_loads(tmp_path, family):
    src, dst = tiny(family, seed=1), tiny(family, seed=2)
    assert not same_weights(src, dst)
    path = tmp_path / "plain.pt"
    torch.save(src.state_dict(), path)
    assert load_checkpoint(dst, path) is dst
    assert same_weights(dst, src)
    assert load_checkpoint(tiny(family, seed=3), str(path)) is not None  # str paths too


def test_training_checkpoint_uses_the_ema_weights(tmp_path):
    model, ema, dst = tiny(seed=1), tiny(seed=2), tiny(seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    path = tmp_path / "0001000.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "args": argparse.Namespace(model="DiT-XL/2", image_size=256)}, path)
    load_checkpoint(dst, path)
    assert same_weights(dst, ema)
    assert not same_weights(dst, model)


def test_model_only_checkpoint_loads(tmp_path):
    src, dst = tiny(seed=4), tiny(seed=5)
    path = tmp_path / "model_only.pt"
    torch.save({"model": src.state_dict(), "steps": 10}, path)
    load_checkpoint(dst, path)
    assert same_weights(dst, src)


def test_loaded_objects_are_accepted_without_a_file():
    src, dst = tiny("MDTv2", seed=6), tiny("MDTv2", seed=7)
    load_checkpoint(dst, {"ema": src.state_dict(), "model": tiny("MDTv2", seed=8).state_dict()})
    assert same_weights(dst, src)


def test_loading_keeps_the_model_dtype():
    src = tiny(seed=9)
    dst = tiny(seed=10).double()
    load_checkpoint(dst, src.state_dict())
    assert dst.pos_embed.dtype == torch.float64
    assert torch.equal(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight.double())


def test_extract_refuses_what_is_not_a_checkpoint():
    with pytest.raises(CheckpointError, match="not a state dict"):
        extract_state_dict([1, 2, 3])
    with pytest.raises(CheckpointError, match="not a state dict"):
        extract_state_dict({"weights": "elsewhere", "step": 3})


# ----------------------------------------------------------------------------- mismatches


def test_wrong_shapes_name_the_keys_and_the_fitting_preset():
    with torch.device("meta"):  # shapes only: the mismatch is reported before anything is copied
        small = create_model("DiT-S/2", input_size=8).state_dict()
        base = create_model("DiT-B/2", input_size=8)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(base, small)
    msg = str(err.value)
    assert "\n" not in msg
    # every tensor but final_layer.linear.bias (p²·8 rows either way) has the wrong shape
    assert "wrong shape: blocks.0.adaLN_modulation.1.bias" in msg and "(131)" in msg
    assert "DiT-S/2 (input_size=8)" in msg


def test_missing_and_unexpected_keys_are_named(tmp_path):
    src = tiny(depth=3)
    path = tmp_path / "deeper.pt"
    torch.save(src.state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tiny(depth=2), path)
    msg = str(err.value)
    assert "unexpected: blocks.2.adaLN_modulation.1.bias" in msg and "(10)" in msg and "missing" not in msg
    assert "depth=3" in msg  # the suggestion describes the checkpoint's own layout

    small = tiny(depth=1).state_dict()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tiny(depth=2), small)
    msg = str(err.value)
    assert "missing: blocks.1.adaLN_modulation.1.bias" in msg and "(10)" in msg and "unexpected" not in msg


def test_family_mismatch_lists_both_sides():
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tiny("DiT"), tiny("MDTv2", depth=3).state_dict())
    msg = str(err.value)
    assert "missing: blocks.0." in msg
    assert "unexpected: de_blocks.0." in msg
    assert "the checkpoint fits MDTv2" in msg


def test_non_strict_loading_skips_the_check():
    dst = tiny(depth=2)
    load_checkpoint(dst, tiny(depth=1, seed=11).state_dict(), strict=False)
    assert torch.equal(dst.blocks[0].mlp.fc2.bias, tiny(depth=1, seed=11).blocks[0].mlp.fc2.bias)


# ----------------------------------------------------------------------------- unreadable files


def test_missing_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tiny(), path)
    assert "does not exist" in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp_path)  # a folder is not a checkpoint either


@pytest.mark.parametrize("kind", ["garbage", "empty", "truncated"])
def test_corrupt_file_is_a_one_line_error(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "garbage":
        path.write_bytes(b"this is not a checkpoint" * 20)
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        torch.save(tiny().state_dict(), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tiny(), path)
    msg = str(err.value)
    assert msg.startswith(f"cannot read checkpoint {path}: ")
    assert "\n" not in msg


# ----------------------------------------------------------------------------- suggestions


def meta_state(name, **kw):
    with torch.device("meta"):
        return create_model(name, **kw).state_dict()


def test_suggest_preset_for_the_official_layouts():
    assert suggest_preset(meta_state("MDTv2-XL/2")) == "MDTv2-XL/2 (input_size=32)"
    assert suggest_preset(meta_state("MDT-XL/2")) == "MDT-XL/2 (input_size=32)"
    assert suggest_preset(meta_state("MDT-B/4", input_size=16)) == "MDT-B/4 (input_size=16)"
    assert suggest_preset(meta_state("DiT-XL/2", input_size=64)) == "DiT-XL/2 (input_size=64)"


def test_suggest_preset_tells_mdt_from_dit_and_names_the_needed_overrides():
    # same trunk shapes, told apart by MDT's extra parameters
    assert suggest_preset(meta_state("DiT-S/2", input_size=8)).startswith("DiT-S/2")
    assert suggest_preset(meta_state("MDT-S/2", input_size=8)).startswith("MDT-S/2")
    odd = suggest_preset(meta_state("MDTv2", depth=28, hidden_size=1152, num_heads=16, decode_layer=2))
    assert odd == "MDTv2-XL/2 (input_size=32, decode_layer=2)"
    digits = suggest_preset(meta_state("DiT-S/2", input_size=8, in_channels=1, num_classes=10))
    assert digits == "DiT-S/2 (input_size=8, in_channels=1, num_classes=10)"


def test_suggested_preset_rebuilds_the_same_layout():
    state = meta_state("MDTv2-S/2", input_size=16, in_channels=3, num_classes=5, learn_sigma=False)
    hint = suggest_preset(state)
    name, _, args = hint.partition(" (")
    overrides = {}
    for part in args.rstrip(")").split(", "):
        key, value = part.split("=")
        overrides[key] = {"True": True, "False": False}.get(value, value if not value.isdigit() else int(value))
    rebuilt = meta_state(name, **overrides)
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in state.items()}


def test_suggest_preset_without_a_preset_describes_the_layout():
    hint = suggest_preset(tiny("MDTv2", depth=3).state_dict())
    assert hint.startswith("MDTv2 (") and "hidden_size=32" in hint and "decode_layer=1" in hint
    assert suggest_preset({"foo": torch.zeros(2)}) is None


# ----------------------------------------------------------------------------- download


def test_official_files_are_listed_with_their_presets():
    assert OFFICIAL_WEIGHTS["DiT-XL-2-256x256.pt"].preset == "DiT-XL/2"
    assert OFFICIAL_WEIGHTS["DiT-XL-2-512x512.pt"].overrides["input_size"] == 64
    assert OFFICIAL_WEIGHTS["mdt_xl2_v2_ckpt.pt"].preset == "MDTv2-XL/2"
    assert OFFICIAL_WEIGHTS["mdt_xl2_v1_ckpt.pt"].overrides["decode_layer"] == 2


def test_download_of_an_unknown_name_fails_without_network(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "_fetch", lambda *a: pytest.fail("must not fetch"))
    with pytest.raises(CheckpointError, match="unknown official file"):
        download_official("DiT-XL-2-1024x1024.pt", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_download_is_atomic_and_skips_existing_files(tmp_path, monkeypatch):
    calls = []

    def fake_fetch(url, out, progress, name):
        calls.append((url, name))
        assert [p.name for p in tmp_path.iterdir()][0].endswith(".part")  # written into a temporary file
        assert not (tmp_path / "mdt_xl2_v2_ckpt.pt").exists()  # the target appears only at the end
        out.write(b"weights")

    monkeypatch.setattr(ckpt, "_fetch", fake_fetch)
    target = download_official("mdt_xl2_v2_ckpt.pt", tmp_path, progress=False)
    assert target == tmp_path / "mdt_xl2_v2_ckpt.pt"
    assert target.read_bytes() == b"weights"
    assert calls and calls[0][0] == OFFICIAL_WEIGHTS["mdt_xl2_v2_ckpt.pt"].url
    assert [p.name for p in tmp_path.iterdir()] == ["mdt_xl2_v2_ckpt.pt"]  # no .part left
    download_official("mdt_xl2_v2_ckpt.pt", tmp_path, progress=False)
    assert len(calls) == 1  # an existing file is not fetched again


def test_failed_download_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken_fetch(url, out, progress, name):
        out.write(b"half")
        raise CheckpointError(f"cannot download {url}: connection reset")

    monkeypatch.setattr(ckpt, "_fetch", broken_fetch)
    with pytest.raises(CheckpointError, match="cannot download"):
        download_official("DiT-XL-2-256x256.pt", tmp_path / "weights", progress=False)
    assert list((tmp_path / "weights").iterdir()) == []
