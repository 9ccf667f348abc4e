"""Gaussian diffusion of ADM / IDDPM as used by DiT and MDT.

The numerics follow ADM (openai/improved-diffusion and openai/guided-diffusion)
as used by DiT (facebookresearch/DiT ``diffusion/``): float64 schedules,
epsilon prediction with a learned-range variance, ADM's timestep respacing, and
the same use of the global RNG, so seeded samples match the official code to
float32 rounding. Additions for this project: any callable as the model, a
``generator`` argument (one ``torch.Generator``, or one per batch row so each
sample's randomness is independent of its batch), and a ``step_listener``
called before each model evaluation.

Typical use, as with DiT::

    diffusion = create_diffusion("250")
    samples = diffusion.p_sample_loop(model.forward_with_cfg, z.shape, z,
                                      clip_denoised=False, model_kwargs=kw)
"""
from __future__ import annotations

from typing import Optional

from . import gaussian_diffusion as gd
from .gaussian_diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType
from .respace import SpacedDiffusion, space_timesteps
from .rng import randn_rows
from .schedules import betas_for_alpha_bar, get_named_beta_schedule

__all__ = [
    "create_diffusion",
    "GaussianDiffusion",
    "SpacedDiffusion",
    "space_timesteps",
    "get_named_beta_schedule",
    "betas_for_alpha_bar",
    "randn_rows",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "gd",
]


def create_diffusion(
    timestep_respacing: Optional[str],
    noise_schedule: str = "linear",
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
) -> SpacedDiffusion:
    """Build the diffusion DiT trains and samples with.

    :param timestep_respacing: ``"250"`` (evenly spread fractional stride),
        ``"ddim50"`` (integer stride giving exactly 50 steps), a comma list of
        per-section counts, or ``""`` / ``None`` for all ``diffusion_steps``.
    :param noise_schedule: ``"linear"`` or ``"squaredcos_cap_v2"``.
    :param use_kl: train on the rescaled variational bound instead of MSE.
    :param sigma_small: with a fixed variance, use beta_tilde_t instead of beta_t.
    :param predict_xstart: the model predicts x_0 instead of eps.
    :param learn_sigma: the model outputs 2*C channels, the second half choosing
        Sigma_t within [beta_tilde_t, beta_t] (learned range).
    :param rescale_learned_sigmas: scale the VB term by T / 1000 (RESCALED_MSE).
    :param diffusion_steps: T of the training process.
    """
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    if learn_sigma:
        model_var_type = ModelVarType.LEARNED_RANGE
    elif sigma_small:
        model_var_type = ModelVarType.FIXED_SMALL
    else:
        model_var_type = ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=model_var_type,
        loss_type=loss_type,
    )
