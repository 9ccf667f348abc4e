"""Class-conditional sampling with per-sample randomness, CFG, and an optional caching engine.

The label and every random draw of sample ``i`` come from its own generator seeded by
``(seed, i)``, so a sample never depends on the batch size, the shard, the number of devices or
its batch neighbours (Learning-to-Cache's published FID moved with the GPU count). Every
method sees the same noise and labels, so images compare one to one with the uncached run.

Samplers are named ``ddpm<N>`` and ``ddim<N>``:

* ``ddpm<N>`` — ADM's ancestral sampler on ``N`` evenly (fractionally) strided steps, as DiT's
  ``sample.py`` runs "250";
* ``ddim<N>`` — DDIM (η = 0) on the same fractional striding of ``N`` steps, as ToCa's and
  Learning-to-Cache's DiT code run DDIM-50 (``create_diffusion("50")`` + ``ddim_sample_loop``).
  ADM's integer-stride variant (``"ddim50"`` respacing) is ``ddim<N>-int``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from tokencache.diffusion import create_diffusion


@dataclass(frozen=True)
class Sampler:
    """A parsed sampler name: the respacing string and the loop (``ddpm`` or ``ddim``)."""

    name: str
    loop: str
    steps: int
    respacing: str

    def diffusion(self):
        return create_diffusion(self.respacing)


def parse_sampler(name: str) -> Sampler:
    """``ddpm250`` / ``ddim50`` / ``ddim50-int`` → :class:`Sampler`; a clear error otherwise."""
    match = re.fullmatch(r"(ddpm|ddim)(\d+)(-int)?", name)
    if not match or int(match.group(2)) < 1 or (match.group(3) and match.group(1) != "ddim"):
        raise ValueError(f"unknown sampler {name!r}: use ddpm<N> (e.g. ddpm250), ddim<N> (ddim50) or ddim<N>-int")
    loop, steps, integer = match.group(1), int(match.group(2)), bool(match.group(3))
    if steps < 2:  # ADM's respacing of 1 step keeps only t = 0: no sampler at all
        raise ValueError(f"sampler {name!r}: needs at least 2 steps (ADM's respacing of one step keeps only t = 0); "
                         f"use {loop}2 or more")
    if steps > 1000:
        raise ValueError(f"sampler {name!r}: at most 1000 steps")
    return Sampler(name, loop, steps, f"ddim{steps}" if integer else str(steps))


def sample_seed(seed: int, index: int) -> int:
    """The 63-bit seed of sample ``index`` under run seed ``seed`` (SeedSequence mixing)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def sample_generators(seed: int, indices: Sequence[int], device="cpu") -> list[torch.Generator]:
    """One generator per sample index; each draws its label first, then its noise."""
    return [torch.Generator(device=device).manual_seed(sample_seed(seed, int(i))) for i in indices]


def draw_labels(generators: Sequence[torch.Generator], num_classes: int) -> torch.Tensor:
    """Uniformly random class labels (DiT's protocol), one from each sample's generator."""
    return torch.cat([torch.randint(num_classes, (1,), generator=g, device=g.device) for g in generators])


def guided_model_fn(model: nn.Module, cfg_scale: float, scale_pow: Optional[float] = None) -> Callable:
    """``model_fn(x, t, y)`` for the diffusion loops, batch B in and out.

    With ``cfg_scale`` ≠ 1 it runs the model's ``forward_with_cfg`` on [x; x] with labels
    [y; null] (the official batching, so a caching engine sees 2B rows) and returns the guided
    first half. MDT's power-cosine ramp is used when ``scale_pow`` is given (MDT models).
    """
    family = getattr(model, "family", "DiT")
    if cfg_scale == 1.0 and family == "DiT":
        return lambda x, t, y: model(x, t, y)

    def fn(x, t, y):
        b = x.shape[0]
        null = torch.full_like(y, model.num_classes)
        x2, t2, y2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])
        if family == "MDT":
            out = model.forward_with_cfg(x2, t2, y2, cfg_scale, scale_pow=4.0 if scale_pow is None else scale_pow)
        else:
            out = model.forward_with_cfg(x2, t2, y2, cfg_scale)
        return out[:b]

    return fn


@torch.no_grad()
def generate(model: nn.Module, sampler: Sampler | str, labels: torch.Tensor, generators: Sequence[torch.Generator],
             cfg_scale: float = 1.0, scale_pow: Optional[float] = None, step_listener=None,
             progress: bool = False, diffusion=None, clip_denoised: bool = False) -> torch.Tensor:
    """Sample ``len(labels)`` images (in the model's space, [-1, 1] for pixels) with one loop.

    ``step_listener(step_index, num_steps)`` is told each step before the model runs (the
    caching engine's clock; when it is a bound method of an object with ``bind_samples``, as
    :meth:`tokencache.cache.CacheEngine.step_listener` is, that object is first told the
    samples' ``generators``, whose seeds a method's own random draws derive from). ``clip_denoised`` clamps each predicted x_0 to [-1, 1]: off for
    latent models (DiT's ``sample.py``), on for pixel models (ADM). Returns x_0 (B, C, H, W).
    """
    sampler = parse_sampler(sampler) if isinstance(sampler, str) else sampler
    bind = getattr(getattr(step_listener, "__self__", None), "bind_samples", None)
    if bind is not None:  # an engine's clock: its method may draw from per-sample streams
        bind(generators)
    diffusion = diffusion or sampler.diffusion()
    device = next(model.parameters()).device
    shape = (len(labels), model.in_channels, model.input_size, model.input_size)
    fn = guided_model_fn(model, cfg_scale, scale_pow)
    kwargs = dict(clip_denoised=clip_denoised, model_kwargs={"y": labels.to(device)}, device=device, progress=progress,
                  generator=list(generators), step_listener=step_listener)
    if sampler.loop == "ddpm":
        return diffusion.p_sample_loop(fn, shape, **kwargs)
    return diffusion.ddim_sample_loop(fn, shape, eta=0.0, **kwargs)
