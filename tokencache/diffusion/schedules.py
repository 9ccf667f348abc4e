"""Noise schedules beta_1..beta_T, kept in float64.

The schedules are the ones of Ho et al. (DDPM, "linear") and Nichol & Dhariwal
(IDDPM, "squaredcos_cap_v2"), as used by ADM and DiT. They are float64 numpy
arrays because alpha_bar_t = prod_{s<=t} (1 - beta_s) loses several digits in
float32 near t = T, and every downstream coefficient is derived from it.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np


def linear_beta_schedule(num_diffusion_timesteps: int) -> np.ndarray:
    """DDPM's linear betas, rescaled so any T gives the same process as T = 1000.

    With scale = 1000 / T the betas run linearly from scale * 1e-4 to
    scale * 0.02; for T = 1000 this is exactly Ho et al.'s schedule.
    """
    scale = 1000 / num_diffusion_timesteps
    return np.linspace(
        scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64
    )


def betas_for_alpha_bar(
    num_diffusion_timesteps: int,
    alpha_bar: Callable[[float], float],
    max_beta: float = 0.999,
) -> np.ndarray:
    """Discretise a continuous alpha_bar(s), s in [0, 1], into T betas.

    beta_t = 1 - alpha_bar(t / T) / alpha_bar((t - 1) / T), capped at
    ``max_beta`` so that the last step does not collapse the signal to zero
    (which would make 1 / alpha_bar blow up).
    """
    betas = []
    for i in range(num_diffusion_timesteps):
        s_prev = i / num_diffusion_timesteps
        s_next = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(s_next) / alpha_bar(s_prev), max_beta))
    return np.array(betas)


def _cosine_alpha_bar(s: float) -> float:
    """IDDPM's cosine alpha_bar with offset 0.008, so beta_1 is not vanishingly small."""
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Return the betas of a named schedule: ``"linear"`` or ``"squaredcos_cap_v2"``."""
    if schedule_name == "linear":
        return linear_beta_schedule(num_diffusion_timesteps)
    if schedule_name == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_diffusion_timesteps, _cosine_alpha_bar)
    raise ValueError(f"unknown beta schedule {schedule_name!r}: use 'linear' or 'squaredcos_cap_v2'")
