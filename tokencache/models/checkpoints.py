"""Loading and fetching checkpoints in the official formats.

Official DiT / MDT files are plain state dicts; training checkpoints (DiT's ``train.py``, and
this package's ``train-backbone``) are dicts with "model", "ema" and more, where the EMA weights
are the ones to sample with. A mismatch fails with one message naming the missing and unexpected
keys and the preset whose layout would fit.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from tokencache.errors import UserError
from tokencache.io import sha256_file, write_atomic


class CheckpointError(UserError, ValueError):
    """A checkpoint that does not fit the model, or cannot be read."""


@dataclass(frozen=True)
class OfficialWeights:
    filename: str
    url: str
    preset: str
    overrides: dict
    sha256: Optional[str]  # None where no checksum is published; results record the file's sha256


OFFICIAL_WEIGHTS = {
    "DiT-XL-2-256x256.pt": OfficialWeights(
        "DiT-XL-2-256x256.pt", "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt",
        "DiT-XL/2", {"input_size": 32}, None),
    "DiT-XL-2-512x512.pt": OfficialWeights(
        "DiT-XL-2-512x512.pt", "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt",
        "DiT-XL/2", {"input_size": 64}, None),
    "mdt_xl2_v1_ckpt.pt": OfficialWeights(
        "mdt_xl2_v1_ckpt.pt", "https://huggingface.co/shgao/MDT-XL2/resolve/main/mdt_xl2_v1_ckpt.pt",
        "MDT-XL/2", {"input_size": 32, "decode_layer": 2}, None),
    "mdt_xl2_v2_ckpt.pt": OfficialWeights(
        "mdt_xl2_v2_ckpt.pt", "https://huggingface.co/shgao/MDT-XL2/resolve/main/mdt_xl2_v2_ckpt.pt",
        "MDTv2-XL/2", {"input_size": 32, "decode_layer": 4}, None),
}


def extract_state_dict(obj) -> dict:
    """The weights to sample with from whatever ``torch.load`` returned: EMA first, then model."""
    if isinstance(obj, dict) and "ema" in obj and isinstance(obj["ema"], dict):
        return obj["ema"]
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj["model"]
    if isinstance(obj, dict) and all(torch.is_tensor(v) for v in obj.values()):
        return obj
    raise CheckpointError("not a state dict nor a training checkpoint with 'ema' or 'model'")


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The file of a checkpoint argument: ``shipped:DiT-digits`` is the shipped testbed file (checked)."""
    from tokencache.weights import resolve

    return Path(resolve(path))


def read_checkpoint(path: str | os.PathLike) -> dict:
    """``torch.load`` on CPU with a one-line error for missing or unreadable files.

    ``shipped:NAME`` reads the testbed weights that ship with the package (:mod:`tokencache.weights`).
    """
    path = checkpoint_file(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for corrupt files
        reason = " ".join(str(exc).split()) or type(exc).__name__  # one line, whatever torch says
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from exc


def _layout_of(state_dict: dict) -> Optional[tuple[str, dict]]:
    """(family, constructor keywords) read off a state dict's shapes; None if it is not a DiT/MDT.

    ``num_heads`` is only recoverable for MDT (relative-bias table); ``num_classes`` assumes
    the null-class row of classifier-free guidance (``class_dropout_prob > 0``).
    """
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    pos = shapes.get("pos_embed")
    proj = shapes.get("x_embedder.proj.weight")
    if pos is None or proj is None or len(pos) != 3 or len(proj) != 4:
        return None
    hidden, in_ch, patch = pos[2], proj[1], proj[2]
    grid = int(round(pos[1] ** 0.5))
    kw = dict(input_size=grid * patch, patch_size=patch, in_channels=in_ch, hidden_size=hidden)
    table = shapes.get("y_embedder.embedding_table.weight")
    if table is not None:
        kw["num_classes"] = table[0] - 1
    final = shapes.get("final_layer.linear.weight")
    if final is not None:
        kw["learn_sigma"] = final[0] // (patch * patch) == 2 * in_ch

    def count(prefix: str) -> int:
        return len({k.split(".")[1] for k in shapes if k.startswith(prefix)})

    if any(k.startswith("en_inblocks.") for k in shapes):
        family = "MDTv2"
        kw["decode_layer"] = count("de_blocks.")
        kw["depth"] = 2 * count("en_inblocks.") + kw["decode_layer"]
    else:
        family = "MDT" if "mask_token" in shapes else "DiT"
        kw["depth"] = count("blocks.")
    bias = [v for k, v in shapes.items() if k.endswith("relative_position_bias_table")]
    if bias:
        kw["num_heads"] = bias[0][1]
    return family, kw


def suggest_preset(state_dict: dict) -> Optional[str]:
    """The preset (+ the overrides it needs) whose parameter layout matches ``state_dict``.

    A preset is only suggested if building it with those overrides (on the meta device, no
    memory) reproduces every key and shape of ``state_dict``; otherwise the family with the
    keywords read off the shapes is returned.
    """
    from tokencache.models.registry import FAMILY_DEFAULTS, PRESETS, create_model

    layout = _layout_of(state_dict)
    if layout is None:
        return None
    family, found = layout
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    defaults = dict(in_channels=4, num_classes=1000, learn_sigma=True, **FAMILY_DEFAULTS[family])
    for name, (fam, kw) in PRESETS.items():
        if fam != family or any(kw[k] != found[k] for k in ("hidden_size", "patch_size", "depth")):
            continue
        if "num_heads" in found and kw["num_heads"] != found["num_heads"]:
            continue
        overrides = {"input_size": found["input_size"]}
        for key, default in defaults.items():
            if key in found and found[key] != kw.get(key, default):
                overrides[key] = found[key]
        try:
            with torch.device("meta"):
                probe = create_model(name, **overrides).state_dict()
        except Exception:  # noqa: BLE001 - an unbuildable combination is simply not a fit
            continue
        if {k: tuple(v.shape) for k, v in probe.items()} == shapes:
            return f"{name} ({', '.join(f'{k}={v}' for k, v in overrides.items())})"
    keys = ("hidden_size", "depth", "num_heads", "patch_size", "input_size", "in_channels", "num_classes",
            "learn_sigma", "decode_layer")
    return f"{family} ({', '.join(f'{k}={found[k]}' for k in keys if k in found)})"


def load_checkpoint(model: nn.Module, path_or_state, strict: bool = True) -> nn.Module:
    """Load official or training-checkpoint weights into ``model`` (in place; returns it).

    Accepts a path or an already loaded object. On any key or shape mismatch raises
    :class:`CheckpointError` naming missing/unexpected/mis-shaped keys and the fitting preset.
    """
    obj = read_checkpoint(path_or_state) if isinstance(path_or_state, (str, os.PathLike)) else path_or_state
    state = extract_state_dict(obj)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if strict and (missing or unexpected or shape):
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shape)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''} ({len(keys)})")
        hint = suggest_preset(state)
        fit = f"; the checkpoint fits {hint}" if hint else ""
        raise CheckpointError(f"checkpoint does not fit {type(model).__name__}: {'; '.join(parts)}{fit}")
    model.load_state_dict(state, strict=strict)
    return model


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (:func:`tokencache.io.sha256_file`); ``shipped:NAME`` as in :func:`read_checkpoint`."""
    return sha256_file(checkpoint_file(path))


def download_official(filename: str, folder: str | os.PathLike, progress: bool = True,
                      base_url: Optional[str] = None) -> Path:
    """Download one of :data:`OFFICIAL_WEIGHTS` into ``folder`` (atomic: temp file, then rename).

    Skips the download if the file exists (verifying the checksum where one is known). ``base_url``
    (default ``$TOKENCACHE_MIRROR``, :mod:`tokencache.mirror`): fetch ``BASE/<filename>`` and check
    it against the mirror's manifest instead of the official URL. Needs the network; the test suite
    only reaches a mirror on 127.0.0.1. A transfer cut short is retried, then fails in one line.
    """
    from tokencache.mirror import DownloadError, fetch, mirror_source

    if filename not in OFFICIAL_WEIGHTS:
        raise CheckpointError(f"unknown official file {filename!r}; known: {', '.join(OFFICIAL_WEIGHTS)}")
    spec = OFFICIAL_WEIGHTS[filename]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / filename
    url, sha256 = mirror_source(spec.url, spec.sha256, base_url)
    if not target.exists():
        try:
            fetch(url, target, sha256, progress=progress, stream_fn=lambda *args: _fetch(*args))
        except DownloadError as exc:
            raise CheckpointError(f"{exc}; download it by hand and pass its path") from None
    digest = sha256_of(target)
    if sha256 and digest != sha256:
        raise CheckpointError(f"{target}: sha256 {digest} does not match the expected {sha256}; delete it and retry")
    return target


def _fetch(url: str, out, progress: bool, name: str) -> None:
    """Stream ``url`` into the open binary file ``out`` (:func:`tokencache.mirror.stream`: a body
    shorter than its Content-Length is an error, not a short file)."""
    from tokencache.mirror import stream

    stream(url, out, progress, name)
