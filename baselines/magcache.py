"""``magcache``: MagCache, magnitude-aware cache (Ma et al., arXiv 2506.09045).

**Sources**, ``path:line`` at these commits:

* the official code, Zehong-Ma/MagCache @ df81cb181776c2c61477c08e1d21f87fda1cd938 (FLUX, Wan2.1,
  HunyuanVideo, QwenImage, … — no DiT integration): ``MagCache4FLUX/magcache_flux.py``;
* diffusers, huggingface/diffusers @ 58eb52c0803ea9af3abec60841c2a093bdf1f951,
  ``src/diffusers/hooks/mag_cache.py``.

**The rule.** A calibrated curve gives, per sampling step k, the magnitude ratio γ_k: the mean over
tokens of ‖r_k‖ / ‖r_{k−1}‖, r_k the residual of the whole block stack (last block's output minus
the first block's input) on a full run. From step ``int(r·T + 0.5)`` on (r the retention ratio;
the earlier steps always compute) each step multiplies the accumulated ratio by γ_k, adds one to
the skipped-step count and adds |1 − accumulated ratio| to the accumulated error; it skips iff
the error is ≤ δ and the count ≤ K, else it computes and resets ratio, count and error
(magcache_flux.py:326–338, mag_cache.py:202–224). A skip returns the stack's input plus the
residual stored at the last computed step (magcache_flux.py:340); the final layer always runs.
Here: ``Span(0, L−1, reuse=…)``. The decisions depend on the curve only, not on the sample: at
inference MagCache is a fixed schedule, computed once per run (``plan``; nothing is read back from
the device, and every sample has the same schedule).

**Rules** (``rule``), as the integrations differ:

* ``official`` (default; FLUX): start ``int(r·T + 0.5)``, skip iff err ≤ δ, float64 accumulators;
* ``diffusers``: the same start and test, float32 accumulators (the curve is a float32 tensor);
* ``wan`` (Wan2.1, QwenImage): start ``int(r·T)``, skip iff err < δ (strict).

FLUX's hard-coded always-computed step 11 (magcache_flux.py:332, for its 28-step schedule) belongs
to that model and is not offered. With r = 0 the official FLUX code would try to skip step 0 with
no stored residual (an AttributeError); here, as in diffusers (mag_cache.py:215), a step with
nothing stored computes and resets.

**Defaults.** No DiT setting is published; δ = 0.06, K = 3, r = 0.2 are diffusers'
``MagCacheConfig`` defaults (mag_cache.py:84–137). Others: FLUX δ 0.24, K 5, r 0.1
(magcache_flux.py:466–468); Wan2.1 δ 0.12, K 2, r 0.2.

**Calibration** (``tokencache calibrate --method magcache``): the official script runs one full
generation and records, per step k ≥ 1, ``(‖r_k‖ / ‖r_{k−1}‖).mean()`` (L2 over channels, mean over
batch and tokens), rounded to 5 decimals, the curve being ``[1.0] + those``
(magcache_flux.py:196–207, 459). Here the same over the calibration samples' full trajectories
(all their rows and tokens in one mean, as if they were one batch; seed apart from the evaluation
seeds), per backbone and sampler, rounded as the official script rounds (``rounding``). The file
also keeps each step's standard deviation over tokens, which the official script logs.

**What is ours.** The curve averaged over several calibration samples (the official: one); the
residual is the span's of the model's blocks in execution order (MDTv2: encoder, long skips and
decoder, as for First-Block Cache). MagCache's curves are shipped per model in the official code
and interpolated to other step counts (``nearest_interp``); here a curve is calibrated for each
backbone and sampler, so it always has T entries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import numpy as np
import torch

from tokencache.cache import (
    CacheMethod,
    Calibration,
    Span,
    load_calibration,
    param,
    record_trajectories,
    register_method,
    replay_trajectories,
)

RULES = ("official", "diffusers", "wan")


def magcache_schedule(ratios, num_steps: int, threshold: float, retention_ratio: float, max_skip_steps: int,
                      rule: str = "official") -> tuple[tuple, tuple]:
    """``(skip, errors)`` per step k: whether k reuses the stored residual, and the accumulated error it tested."""
    dtype = np.float32 if rule == "diffusers" else np.float64
    curve = np.asarray(ratios, dtype=dtype)
    start = int(num_steps * retention_ratio) if rule == "wan" else int(retention_ratio * num_steps + 0.5)
    ratio, count, error = dtype(1.0), 0, dtype(0.0)
    stored = False
    skip, errors = [], []
    for k in range(num_steps):
        reuse, tested = False, None
        if k >= start:
            ratio = dtype(ratio * (curve[k] if k < len(curve) else dtype(1.0)))
            count += 1
            error = dtype(error + abs(dtype(1.0) - ratio))
            tested = float(error)
            below = error < threshold if rule == "wan" else error <= threshold
            reuse = bool(below) and count <= max_skip_steps and stored
            if not reuse:
                ratio, count, error = dtype(1.0), 0, dtype(0.0)
        stored = stored or not reuse
        skip.append(reuse)
        errors.append(tested)
    return tuple(skip), tuple(errors)


class _StackResidual(CacheMethod):
    """Calibration-time: computes everything as one span, so the engine keeps the stack's residual."""

    name = "magcache-recorder"

    def params(self) -> dict:
        return {}

    def block_action(self, step, block, inputs):
        return Span(0, self.info.block_count - 1, reuse=False) if block == 0 else None


@dataclass
class MagCacheRatios(Calibration):
    """MagCache's magnitude-ratio curve γ_k, measured on the model's own full trajectories."""

    file_param: ClassVar[str] = "mag_ratios"
    format: ClassVar[str] = "tokencache-magcache-ratios/1"
    title: ClassVar[str] = "MagCache magnitude ratios"
    num_samples: int = param(8, "calibration trajectories (samples (seed, 0…M−1); the official script uses one)",
                             min=1)
    batch_size: int = param(16, "calibration samples per batch", min=1)
    rounding: int = param(5, "decimals each ratio is rounded to (official 5; −1: not rounded, as diffusers)", min=-1)
    seed: int = param(4, "calibration seed: keep it apart from the evaluation seeds", min=0)

    def fit(self, method, model, sampler, sampling, progress=False, log=None):
        if sampler.steps < 2:
            raise ValueError(f"magcache: {sampler.name} has no pair of consecutive steps to measure")
        trajectories = record_trajectories(model, sampler, sampling, self.seed, self.num_samples, self.batch_size,
                                           progress)
        last = int(model.block_count) - 1
        sums = torch.zeros(sampler.steps, dtype=torch.float64)
        squares = torch.zeros(sampler.steps, dtype=torch.float64)
        counts = torch.zeros(sampler.steps, dtype=torch.float64)
        previous = None
        for replayed in replay_trajectories(model, sampler, _StackResidual(), trajectories, self.batch_size):
            norms = replayed.engine.span_residual(0, last).float().norm(dim=-1)  # (rows, N)
            if replayed.step > 0:
                ratios = (norms / previous).double()
                sums[replayed.step] += ratios.sum().cpu()
                squares[replayed.step] += (ratios * ratios).sum().cpu()
                counts[replayed.step] += ratios.numel()
            previous = norms
        mean = sums[1:] / counts[1:]
        std = (squares[1:] / counts[1:] - mean * mean).clamp(min=0).sqrt()
        values = [1.0] + [round(v, self.rounding) if self.rounding >= 0 else v for v in mean.tolist()]
        curve = torch.tensor(values, dtype=torch.float64)
        tensors = {"mag_ratios": curve, "ratio_std": torch.cat([torch.zeros(1, dtype=torch.float64), std])}
        return tensors, {"mag_ratios": values, "min": float(curve.min()), "max": float(curve.max()),
                         "rounding": self.rounding, "tokens_per_step": int(counts[1])}

    def random(self, method, model, sampler, generator):
        """A curve near 1 (1 ± 0.05), for timing: the schedule is fixed before sampling either way."""
        noise = torch.randn(sampler.steps, generator=generator, dtype=torch.float64)
        curve = 1.0 + 0.05 * noise
        curve[0] = 1.0
        return {"mag_ratios": curve}

    def figure(self, tensors, ax, title):
        curve = tensors["mag_ratios"].double().numpy()
        steps = np.arange(len(curve))
        ax.plot(steps, curve, color="tab:blue", marker=".", label="γ_k (mean ‖r_k‖ / ‖r_{k−1}‖)")
        if "ratio_std" in tensors:
            std = tensors["ratio_std"].double().numpy()
            ax.fill_between(steps, curve - std, curve + std, color="tab:blue", alpha=0.2, label="± std over tokens")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set(title=title, xlabel="sampling step k", ylabel="magnitude ratio")
        ax.legend(fontsize=7)
        return True


@dataclass(frozen=True)
class MagPlan:
    skip: tuple  # skip[k]: step k reuses the stack's stored residual
    errors: tuple  # the accumulated error tested at step k (None before the retention steps end)
    curve: tuple  # γ_k as read from the calibration file


@register_method
@dataclass
class MagCache(CacheMethod):
    """Skip the block stack while the accumulated magnitude-ratio error stays within δ (at most K steps in a row)."""

    name = "magcache"
    calibration = MagCacheRatios
    noop = {"max_skip_steps": 0}
    search_space = {"threshold": (0.03, 0.06, 0.12, 0.24, 0.5)}  # δ; diffusers 0.06, Wan 0.12, FLUX 0.24
    mag_ratios: Optional[str] = param(None, "path of the curve file from `tokencache calibrate --method magcache` "
                                            "(required)")
    threshold: float = param(0.06, "δ: skip while the accumulated error Σ|1 − Πγ| stays within it (diffusers 0.06; "
                                   "FLUX 0.24, Wan2.1 0.12)", min=0.0)
    max_skip_steps: int = param(3, "K: most consecutive skipped steps (diffusers 3; FLUX 5, Wan2.1 2)", min=0)
    retention_ratio: float = param(0.2, "r: the first int(r·T + 0.5) steps always compute (diffusers 0.2; FLUX 0.1)",
                                   min=0.0, max=1.0)
    rule: str = param("official", "official (FLUX: float64, err ≤ δ), diffusers (float32 accumulators) or wan "
                                  "(start int(r·T), err < δ)", choices=RULES)

    def plan_for(self, info):
        curve = load_calibration(self, self.mag_ratios, info.model, info.sampler_name)["mag_ratios"]
        if len(curve) != info.num_steps:
            raise ValueError(f"magcache: the curve in {self.mag_ratios} has {len(curve)} steps, the sampler "
                             f"{info.num_steps}: calibrate for this sampler")
        values = tuple(float(v) for v in curve.tolist())
        skip, errors = magcache_schedule(values, info.num_steps, self.threshold, self.retention_ratio,
                                         self.max_skip_steps, self.rule)
        return MagPlan(skip, errors, values)

    def resolved(self):
        if self.plan is None:
            return self.params()
        return {**self.params(), "skipped_steps": [k for k, s in enumerate(self.plan.skip) if s]}

    def block_action(self, step, block, inputs):
        if block != 0:
            return None
        return Span(0, self.info.block_count - 1, reuse=self.plan.skip[step])
