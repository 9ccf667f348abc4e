"""The Stable Diffusion VAE of latent DiT/MDT, and each model's image → uint8 convention.

DiT and MDT generate 4×32×32 (256 px) or 4×64×64 (512 px) latents decoded by diffusers'
``AutoencoderKL`` (``stabilityai/sd-vae-ft-ema``; DiT's ``sample.py`` defaults to ``-mse``, its
FID runs use ``-ema``). Latents are scaled by 0.18215. The uint8 conversion differs between the
two codebases and moves FID slightly, so it follows each model's original:

* DiT (``sample_ddp.py``): ``clamp(127.5·x + 128, 0, 255)`` (rounds half up),
* MDT (``scripts/image_sample.py``): ``((x + 1)·127.5).clamp(0, 255)`` (truncates).
"""
from __future__ import annotations

import numpy as np
import torch

from tokencache.errors import UserError

LATENT_SCALE = 0.18215
VAE_REPOS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


class VAEUnavailable(UserError, RuntimeError):
    """The VAE is neither in a local folder nor in the Hugging Face cache, and the hub cannot be reached."""


def load_vae(variant_or_path: str = "ema", device: str | torch.device = "cpu"):
    """diffusers AutoencoderKL from a local folder or the hub ("ema" / "mse" / a repo id).

    Offline and without a local copy this fails with one line saying where to put the files.
    """
    from diffusers.models import AutoencoderKL

    source = VAE_REPOS.get(variant_or_path, variant_or_path)
    try:
        vae = AutoencoderKL.from_pretrained(source)
    except Exception as exc:  # hub errors come in many types
        raise VAEUnavailable(
            f"cannot load the VAE {source!r} ({type(exc).__name__}); download it with "
            f"`huggingface-cli download {VAE_REPOS['ema']} --local-dir vae-ema` and pass --vae vae-ema"
        ) from exc
    return vae.to(device).eval()


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents (B, 4, h, w) → images in [-1, 1] (B, 3, 8h, 8w)."""
    return vae.decode(latents / LATENT_SCALE).sample


def images_to_uint8(images: torch.Tensor, family: str) -> np.ndarray:
    """Images in [-1, 1] (B, C, H, W) → uint8 (B, H, W, 3) by the family's original rule.

    One-channel (pixel-space testbed) images are repeated to 3 channels, the ADM npz layout.
    """
    if family == "DiT":
        u8 = torch.clamp(127.5 * images + 128.0, 0, 255).to(torch.uint8)
    elif family in ("MDT", "MDTv2"):
        u8 = ((images + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    else:
        raise ValueError(f"no uint8 convention for family {family!r}")
    u8 = u8.permute(0, 2, 3, 1)
    if u8.shape[-1] == 1:
        u8 = u8.repeat(1, 1, 1, 3)
    return u8.cpu().numpy()



def download_vae(variant: str = "ema", endpoint: str | None = None, timeout: float = 600.0) -> dict:
    """Fetch the VAE into the Hugging Face cache; return {file: sha256} of the cached files.

    ``endpoint``: a hub mirror (``HF_ENDPOINT``), e.g. a :class:`tokencache.mirror.MirrorServer`,
    whose ``manifest.json`` then gives the sha256 each file must have (a mismatch is one line, and
    the caller writes no marker, so no job uses the VAE). It runs in a fresh process because
    huggingface_hub reads ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE`` when imported:
    a process that imported it already (or runs offline, as the workflow's jobs do with a mirror)
    cannot be pointed at the mirror. Without ``endpoint``: the hub, as :func:`load_vae` does.
    """
    import json
    import os
    import subprocess
    import sys

    from tokencache.mirror import DownloadError, read_manifest

    repo = VAE_REPOS.get(variant, variant)
    env = dict(os.environ)
    if endpoint:
        env.update(HF_ENDPOINT=endpoint.rstrip("/"), HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1")
    code = "import sys; from tokencache.models.vae import _download_in_process as d; d(sys.argv[1])"
    try:
        done = subprocess.run([sys.executable, "-c", code, variant], env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DownloadError(f"fetching the VAE {repo!r} from {endpoint or 'the hub'} took over {timeout:.0f} s") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise DownloadError(f"cannot fetch the VAE {repo!r} from {endpoint or 'the hub'}: {tail}")
    digests = json.loads(lines[-1])
    if endpoint:
        listed = read_manifest(endpoint)["files"]
        for name, digest in digests.items():
            expected = (listed.get(f"{repo}/{name}") or {}).get("sha256")
            if expected != digest:
                raise DownloadError(f"{endpoint}/{repo}/resolve/main/{name}: sha256 {digest} does not match the "
                                    f"mirror's manifest ({expected or 'not listed'}); the VAE was not accepted")
    return digests


def _download_in_process(variant: str) -> None:
    """:func:`download_vae`'s child: load the VAE (hub or mirror), print {file: sha256} of its cached files."""
    import json

    from huggingface_hub import hf_hub_download

    from tokencache.io import sha256_file

    load_vae(variant, "cpu")
    repo = VAE_REPOS.get(variant, variant)
    digests = {}
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        try:
            digests[name] = sha256_file(hf_hub_download(repo, name, local_files_only=True))
        except Exception:  # noqa: BLE001 - a repository with .bin weights: report what is there
            continue
    print(json.dumps(digests))
