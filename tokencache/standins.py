"""Stand-ins for the downloads of the paper configuration, in the official formats, made from a seed.

``config/paper.yaml`` needs files from the internet: the official DiT-XL/2 and MDTv2-XL/2
checkpoints, the ``stabilityai/sd-vae-ft-ema`` VAE, torch-fidelity's Inception-v3 weights and ADM's
reference batch. :func:`build_standins` writes a file of the same name, format and layout for each,
with random values drawn from one seed, so that the workflow's download rules, loaders and
evaluation can be rehearsed on a CPU without the internet (served by :class:`tokencache.mirror.MirrorServer`):

* ``DiT-XL-2-256x256.pt``, ``mdt_xl2_v2_ckpt.pt``: plain state dicts with exactly the official key
  names (the models of :mod:`tokencache.models` follow the official layouts, MDTv2's
  ``sideblocks`` side-interpolater, ``mask_token`` and ``decoder_pos_embed`` included), narrowed
  by constructor overrides per preset (default :data:`DEFAULT_MODEL_SET`: hidden size 32, 2 heads,
  the official depth). They load the way the official files do, through the preset of their file
  name, given the same overrides: ``tokencache sample --checkpoint DiT-XL-2-256x256.pt --model-set
  hidden_size=32 num_heads=2`` (``tokencache.run.build_model(path, overrides=…)``).
* ``stabilityai/sd-vae-ft-ema/``: a diffusers ``AutoencoderKL`` in ``save_pretrained``'s format
  (``config.json`` + ``diffusion_pytorch_model.safetensors``) whose config has the keys of the
  official one (:data:`VAE_CONFIG`) with tiny channels; four blocks, so 4×32×32 latents still
  decode to 3×256×256 images. The folder sits at the repository's path, so a mirror serves it at
  the hub's URLs and ``--vae <folder>`` loads it directly.
* ``weights-inception-2015-12-05-6726825d.pth``: torch-fidelity's Inception-v3 state dict (the
  name of ``URL_INCEPTION_V3``, every key and shape of ``FeatureExtractorInceptionV3``), random
  convolutions with batch norms at identity statistics so the features neither vanish nor blow up.
* ``VIRTUAL_imagenet256_labeled.npz``: ADM's reference batch layout (:data:`REFERENCE_LAYOUT`) with
  fewer images, whose ``mu``/``sigma``/``mu_s``/``sigma_s`` are computed as ADM computes them, with
  the stand-in Inception over its own images: an evaluation against it is self-consistent.
* ``manifest.json``: every file's sha256 and size (what a mirror checks downloads against), the
  seed and the overrides each checkpoint was made with.

Everything is a function of the seed and the options: two builds give the same bytes (no time
stamps: npz through :func:`tokencache.io.write_atomic`, torch archives and safetensors without dates).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from tokencache.io import write_atomic
from tokencache.models.registry import parse_override_value

#: the official checkpoints a stand-in is made for (the paper configuration's 256-px backbones)
STANDIN_CHECKPOINTS = ("DiT-XL-2-256x256.pt", "mdt_xl2_v2_ckpt.pt")
#: constructor overrides of the stand-in checkpoints unless the caller gives others (per preset)
DEFAULT_MODEL_SET = {"hidden_size": 32, "num_heads": 2}
#: parameters that the official files hold as fixed sin-cos tables: kept as the model builds them
FIXED_PARAMETERS = ("pos_embed", "decoder_pos_embed")
#: the VAE's repository, which is also its folder among the stand-ins
VAE_REPO = "stabilityai/sd-vae-ft-ema"
#: the keys of sd-vae-ft-ema's config.json, with tiny channels (the official: 128, 256, 512, 512 and
#: 32 groups, 2 layers per block); four blocks keep the 8x upsampling of 4x32x32 latents to 256 px
VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.4.2",
    "act_fn": "silu",
    "block_out_channels": [8, 8, 8, 8],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
#: ADM's reference batch for ImageNet 256 (openai/guided-diffusion, evaluations/README.md)
REFERENCE_NAME = "VIRTUAL_imagenet256_labeled.npz"
#: its arrays: name → (dtype, shape with None for the image count). ADM's evaluator writes the
#: statistics with np.mean (float32 activations → float32) and np.cov (→ float64); the images
#: are uint8 NHWC, the labels int64. Derived from ADM's code, not read off the 1.6 GB file.
REFERENCE_LAYOUT = {
    "arr_0": ("uint8", (None, 256, 256, 3)),
    "arr_1": ("int64", (None,)),
    "mu": ("float32", (2048,)),
    "sigma": ("float64", (2048, 2048)),
    "mu_s": ("float32", (2023,)),
    "sigma_s": ("float64", (2023, 2023)),
}
DEFAULT_REFERENCE_IMAGES = 16


def _seed_of(seed: int, what: str) -> int:
    """A 63-bit seed per file, from the build's seed and the file's name (files do not share noise)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{what}".encode()).digest()[:8], "little") >> 1


def inception_filename() -> str:
    """torch-fidelity's Inception-v3 weights file name (the basename of its download URL)."""
    import tokencache  # noqa: F401  (its torchvision fix must come before torch-fidelity)
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return os.path.basename(URL_INCEPTION_V3)


def parse_model_sets(items: list[str]) -> dict[str, dict]:
    """``["DiT-XL/2:hidden_size=64,num_heads=4"]`` → {"DiT-XL/2": {"hidden_size": 64, "num_heads": 4}}
    (numbers, true/false and null typed as in ``--model-set``; keys checked by :func:`checkpoint_overrides`)."""
    from tokencache.models.checkpoints import OFFICIAL_WEIGHTS

    presets = {OFFICIAL_WEIGHTS[f].preset for f in STANDIN_CHECKPOINTS}
    sets: dict[str, dict] = {}
    for item in items or []:
        preset, sep, rest = item.partition(":")
        pairs = [part.strip() for part in rest.split(",") if part.strip()]
        if not sep or preset not in presets or not pairs or any("=" not in pair for pair in pairs):
            raise ValueError(f"--model-set {item!r}: give PRESET:key=value[,key=value…] with PRESET one of "
                             f"{', '.join(sorted(presets))}")
        for pair in pairs:
            key, raw = (x.strip() for x in pair.split("=", 1))
            sets.setdefault(preset, {})[key] = parse_override_value(raw)
    return sets


def checkpoint_overrides(filename: str, model_set: Optional[dict] = None) -> tuple[str, dict]:
    """(preset, constructor keywords) of a stand-in checkpoint: the official file's, then ``model_set``
    (default :data:`DEFAULT_MODEL_SET`). The same overrides load it (``build_model``'s ``overrides``)."""
    from tokencache.models.checkpoints import OFFICIAL_WEIGHTS
    from tokencache.models.registry import resolve

    spec = OFFICIAL_WEIGHTS[filename]
    overrides = dict(DEFAULT_MODEL_SET if model_set is None else model_set)
    try:
        resolve(spec.preset, **overrides)
    except ValueError as exc:
        raise ValueError(f"--model-set {spec.preset}: {exc}") from None
    return spec.preset, {**spec.overrides, **overrides}


def standin_state_dict(filename: str, seed: int, model_set: Optional[dict] = None) -> dict:
    """The stand-in of an official checkpoint: the model's state dict (official key names, order and
    shapes for these overrides) with seeded random weights, sin-cos tables and index buffers as built."""
    from tokencache.models.registry import create_model

    preset, overrides = checkpoint_overrides(filename, model_set)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the constructor's own initialisation: fixed, and the caller's RNG untouched
        model = create_model(preset, **overrides)
    generator = torch.Generator().manual_seed(_seed_of(seed, filename))
    params = dict(model.named_parameters())
    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().clone().contiguous()
        if key in params and key not in FIXED_PARAMETERS and value.is_floating_point():
            value = torch.randn(value.shape, generator=generator, dtype=torch.float32).to(value.dtype) * 0.02
        state[key] = value
    return state


def write_vae(folder: str | os.PathLike, seed: int) -> None:
    """A tiny ``AutoencoderKL`` in ``save_pretrained``'s format with sd-vae-ft-ema's config keys."""
    from diffusers.models import AutoencoderKL
    from safetensors.torch import save

    config = {k: v for k, v in VAE_CONFIG.items() if not k.startswith("_")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed_of(seed, VAE_REPO))
        vae = AutoencoderKL(**config)
    state = {k: v.detach().clone().contiguous() for k, v in vae.state_dict().items()}
    folder = Path(folder)
    write_atomic(folder / "diffusion_pytorch_model.safetensors", save(state, metadata={"format": "pt"}))
    write_atomic(folder / "config.json", json.dumps(VAE_CONFIG, indent=2) + "\n")


class _InceptionLayout:
    """torch-fidelity's Inception-v3 built without reading any weights (their keys and shapes only)."""

    @staticmethod
    def build():
        import io

        import tokencache  # noqa: F401
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        class Unloaded(FeatureExtractorInceptionV3):
            def load_state_dict(self, state_dict, strict=True, assign=False):  # the layout, nothing to load
                return None

        empty = io.BytesIO()
        torch.save({}, empty)
        empty.seek(0)
        return Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)


def inception_state_dict(seed: int) -> dict:
    """Random Inception-v3 weights in torch-fidelity's layout: He-scaled convolutions, batch norms at
    identity (weight 1, bias 0, mean 0, variance 1), a random classifier."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = _InceptionLayout.build()
    generator = torch.Generator().manual_seed(_seed_of(seed, "inception"))
    state = {}
    for key, value in net.state_dict().items():
        value = value.detach().clone().contiguous()
        if key.endswith("conv.weight") or key == "fc.weight":
            fan_in = value[0].numel()
            value = torch.randn(value.shape, generator=generator) * (2.0 / fan_in) ** 0.5
        elif key.endswith(("bn.weight", "bn.running_var")):
            value = torch.ones_like(value)
        elif key.endswith(("bn.bias", "bn.running_mean")) or key == "fc.bias":
            value = torch.zeros_like(value)
        state[key] = value
    return state


def reference_images(count: int, seed: int, side: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """``count`` smooth random uint8 images (N, side, side, 3) and labels in [0, 1000), from ``seed``."""
    rng = np.random.default_rng(_seed_of(seed, REFERENCE_NAME))
    coarse = rng.integers(0, 256, size=(count, 8, 8, 3)).astype(np.float32)
    images = torch.nn.functional.interpolate(torch.from_numpy(coarse).permute(0, 3, 1, 2), size=(side, side),
                                             mode="bilinear", align_corners=False)
    images = images.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    return images, rng.integers(0, 1000, size=count).astype(np.int64)


def write_reference(path: str | os.PathLike, weights: str | os.PathLike, count: int, seed: int) -> None:
    """ADM's reference batch layout, the statistics computed with ``weights`` over its own images."""
    from tokencache.metrics.features import extract_features, load_extractor

    images, labels = reference_images(count, seed)
    extractor = load_extractor("inception", weights, "cpu")
    feats = extract_features(images, extractor, batch_size=8, progress=False)

    def stats(features):  # ADM's compute_statistics: np.mean of float32 activations, np.cov
        features = np.asarray(features, dtype=np.float32)
        return np.mean(features, axis=0), np.cov(features, rowvar=False)

    mu, sigma = stats(feats["pool"])
    mu_s, sigma_s = stats(feats["spatial"])
    arrays = {"arr_0": images, "arr_1": labels, "mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
    for key, (dtype, shape) in REFERENCE_LAYOUT.items():  # the layout is a promise: keep it
        value = arrays[key]
        assert value.dtype == np.dtype(dtype) and len(value.shape) == len(shape), (key, value.dtype, value.shape)
        assert all(s is None or s == v for s, v in zip(shape, value.shape)), (key, value.shape)
    write_atomic(path, arrays, format="npz")


def build_standins(out_dir: str | os.PathLike, seed: int = 0, model_sets: Optional[dict[str, dict]] = None,
                   reference_count: int = DEFAULT_REFERENCE_IMAGES) -> dict:
    """Write every stand-in and ``manifest.json`` into ``out_dir``; return the manifest.

    ``model_sets``: preset → constructor overrides of its stand-in checkpoint (default
    :data:`DEFAULT_MODEL_SET` for each). Each file is written atomically; the same arguments
    give the same bytes.
    """
    from tokencache.mirror import write_manifest
    from tokencache.models.checkpoints import OFFICIAL_WEIGHTS

    if reference_count < 2:
        raise ValueError(f"the reference batch needs at least 2 images for a covariance, got {reference_count}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_sets = dict(model_sets or {})
    models = {}
    for filename in STANDIN_CHECKPOINTS:
        preset = OFFICIAL_WEIGHTS[filename].preset
        model_set = model_sets.get(preset)
        state = standin_state_dict(filename, seed, model_set)
        write_atomic(out / filename, state, format="torch")
        _, overrides = checkpoint_overrides(filename, model_set)
        models[filename] = {"preset": preset, "overrides": overrides,
                            "model_set": dict(DEFAULT_MODEL_SET if model_set is None else model_set)}
    write_vae(out / VAE_REPO, seed)
    inception = out / inception_filename()
    write_atomic(inception, inception_state_dict(seed), format="torch")
    write_reference(out / REFERENCE_NAME, inception, reference_count, seed)
    return write_manifest(out, {"what": "tokencache stand-ins (random weights in the official formats)",
                                "seed": seed, "reference_images": reference_count, "checkpoints": models,
                                "vae": VAE_REPO})


def standins_recipe(manifest: dict) -> dict:
    """The arguments a manifest was built with (to tell whether a folder is up to date)."""
    return {"seed": manifest.get("seed"), "reference_images": manifest.get("reference_images"),
            "model_sets": {v["preset"]: v.get("model_set") for v in manifest.get("checkpoints", {}).values()}}
