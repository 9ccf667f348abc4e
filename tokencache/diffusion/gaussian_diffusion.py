"""Gaussian diffusion: forward process q, learned reverse process p, samplers, losses.

The numerics follow ADM (openai/improved-diffusion and openai/guided-diffusion)
as used by DiT and MDT: every schedule quantity is a float64 numpy array, is
gathered at the batch's timesteps in float64 and only then cast to float32, and
each formula is evaluated in the same order as there, so samples agree with the
official code to float32 rounding and seeded runs consume the global RNG the
same way.

Notation (Ho et al. 2020, Nichol & Dhariwal 2021): beta_t is the noise added at
step t, alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s, and
q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I). Timesteps here
are 0-based indices into the betas, so t = 0 is the last denoising step.
"""
from __future__ import annotations

import enum
from collections import OrderedDict
from typing import Callable, Dict, Iterator, Optional, Sequence

import numpy as np
import torch

from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .rng import GeneratorArg, randn_rows

StepListener = Callable[[int, int], None]


class ModelMeanType(enum.Enum):
    """What the network's first C output channels predict."""

    PREVIOUS_X = enum.auto()  # the posterior mean of x_{t-1} directly
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise eps in x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps


class ModelVarType(enum.Enum):
    """How the variance Sigma_t of p(x_{t-1} | x_t) is obtained.

    LEARNED_RANGE (IDDPM) has the network output v in [-1, 1] and interpolates
    log Sigma between the two analytic bounds beta_t and beta_tilde_t, which is
    much easier to learn than the raw log-variance (LEARNED).
    """

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()  # beta_tilde_t, the posterior variance
    FIXED_LARGE = enum.auto()  # beta_t
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    """Training objective: L_simple (MSE), optionally plus L_vlb for Sigma, or L_vlb alone."""

    MSE = enum.auto()  # MSE, plus the VB term when the variance is learned
    RESCALED_MSE = enum.auto()  # as MSE, with the VB term scaled by T / 1000
    KL = enum.auto()  # the variational bound alone
    RESCALED_KL = enum.auto()  # the variational bound times T, an estimate of the full L_vlb

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


def _extract_into_tensor(
    arr: np.ndarray, timesteps: torch.Tensor, broadcast_shape: Sequence[int]
) -> torch.Tensor:
    """Gather ``arr[timesteps]`` in float64, cast to float32, broadcast to ``broadcast_shape``.

    Casting after the gather (not before) keeps each coefficient the float32
    rounding of its float64 value, which is what makes results bit-compatible
    with ADM. The result is a broadcast view of shape ``broadcast_shape``.
    """
    res = _on_device(arr, timesteps.device)[timesteps].float()
    res = res.reshape(tuple(res.shape) + (1,) * (len(broadcast_shape) - res.dim()))
    return res.expand(tuple(broadcast_shape))


#: (id(arr), device) → (arr, its float64 copy on device). A blocking host→device copy makes the
#: host wait for the GPU; the sampling loop reads each schedule array several times per step,
#: so each array is copied once per device and kept (small: ≤ 1000 float64 values each).
_DEVICE_COPIES: "OrderedDict[tuple, tuple]" = OrderedDict()


def _on_device(arr: np.ndarray, device: torch.device) -> torch.Tensor:
    """``torch.from_numpy(arr)`` on ``device``; copied once per (array, device), not per call.

    On the CPU this is a zero-copy view. The entry keeps ``arr`` alive so its id cannot be
    reused; the least recently used entries go beyond 512.
    """
    if device.type == "cpu":
        return torch.from_numpy(arr)
    key = (id(arr), str(device))
    entry = _DEVICE_COPIES.get(key)
    if entry is None or entry[0] is not arr:
        entry = _DEVICE_COPIES[key] = (arr, torch.from_numpy(arr).to(device))
        while len(_DEVICE_COPIES) > 512:
            _DEVICE_COPIES.popitem(last=False)
    _DEVICE_COPIES.move_to_end(key)
    return entry[1]


def _nonzero_mask(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """1 for rows with t > 0, 0 for t = 0: the last step returns the mean, without noise."""
    return (t != 0).float().view(-1, *([1] * (ndim - 1)))


def _resolve_device(model, noise: Optional[torch.Tensor], device) -> torch.device:
    """Device for the sampling loop: explicit, else the noise's, else the model's, else CPU.

    ``model`` may be any callable; for a bound method such as
    ``DiT.forward_with_cfg`` the owning module's parameters are looked at.
    """
    if device is not None:
        return torch.device(device)
    if noise is not None:
        return noise.device
    owner = getattr(model, "__self__", model)
    parameters = getattr(owner, "parameters", None)
    if callable(parameters):
        first = next(iter(parameters()), None)
        if first is not None:
            return first.device
    return torch.device("cpu")


class GaussianDiffusion:
    """A discrete-time Gaussian diffusion defined by its betas.

    :param betas: 1-D array of beta_t for t = 0 .. T-1 (0 = least noisy).
    :param model_mean_type: a :class:`ModelMeanType`.
    :param model_var_type: a :class:`ModelVarType`.
    :param loss_type: a :class:`LossType`.

    Every method that takes ``model`` accepts any callable
    ``model(x, t, **model_kwargs)`` returning a tensor (or a ``(tensor, extra)``
    tuple in :meth:`p_mean_variance`). ``t`` is a 1-D tensor of indices into
    this object's betas; subclasses that skip steps translate it in
    :meth:`model_timesteps` before the model sees it.
    """

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1:
            raise ValueError("betas must be 1-D")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        # alpha_bar_t, and its neighbours alpha_bar_{t-1} (1 before the first step)
        # and alpha_bar_{t+1} (0 after the last), used by DDIM and its inversion.
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0) and its inversion x_0 = x_t / sqrt(alpha_bar) - sqrt(1/alpha_bar - 1) eps.
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # Posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta_tilde_t), Ho et al. eq. 7.
        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        # beta_tilde_0 = 0, so its log is replaced by log beta_tilde_1; this is the
        # lower end of the learned-range interpolation.
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if self.num_timesteps > 1
            else np.array([])
        )
        self.posterior_mean_coef1 = (
            betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )

        # Upper end of the learned range, log beta_t.
        self.log_betas = np.log(betas)
        # FIXED_LARGE uses beta_t, except beta_tilde_1 at t = 0 for a better decoder likelihood.
        if self.num_timesteps > 1:
            self.fixed_large_variance = np.append(self.posterior_variance[1], betas[1:])
        else:
            self.fixed_large_variance = betas.copy()
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)

    # ------------------------------------------------------------------ model call

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timesteps the network is conditioned on for step indices ``t``.

        Identity here; a respaced diffusion maps its indices back to the
        original process's timesteps, which is what the network was trained on.
        """
        return t

    def _call_model(self, model, x: torch.Tensor, t: torch.Tensor, model_kwargs) -> object:
        return model(x, self.model_timesteps(t), **(model_kwargs or {}))

    # ---------------------------------------------------------- forward process q

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = _extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = _extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0): sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError("noise must have the shape of x_start")
        return (
            _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ):
        """Mean, beta_tilde_t and clipped log beta_tilde_t of q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise ValueError("x_start and x_t must have the same shape")
        posterior_mean = (
            _extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + _extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        posterior_variance = _extract_into_tensor(self.posterior_variance, t, x_t.shape)
        posterior_log_variance_clipped = _extract_into_tensor(
            self.posterior_log_variance_clipped, t, x_t.shape
        )
        return posterior_mean, posterior_variance, posterior_log_variance_clipped

    # ---------------------------------------------------------- reverse process p

    def p_mean_variance(
        self,
        model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        model_kwargs: Optional[dict] = None,
    ) -> Dict[str, torch.Tensor]:
        """Evaluate the model once and return p(x_{t-1} | x_t) and its x_0 estimate.

        :param denoised_fn: applied to the x_0 prediction before clipping.
        :param clip_denoised: clamp the x_0 prediction to [-1, 1], the data range.
        :return: dict with ``mean``, ``variance``, ``log_variance`` (Sigma_t),
            ``pred_xstart`` (x_0 estimate) and ``extra`` (the second element when
            the model returns a tuple, else None).
        """
        B, C = x.shape[:2]
        if t.shape != (B,):
            raise ValueError(f"t must have shape ({B},), got {tuple(t.shape)}")
        model_output = self._call_model(model, x, t, model_kwargs)
        extra = None
        if isinstance(model_output, tuple):
            model_output, extra = model_output

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            if model_output.shape != (B, C * 2, *x.shape[2:]):
                raise ValueError(
                    f"a learned variance needs 2*C = {2 * C} output channels, "
                    f"got output shape {tuple(model_output.shape)}"
                )
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = model_var_values
            else:
                min_log = _extract_into_tensor(self.posterior_log_variance_clipped, t, x.shape)
                max_log = _extract_into_tensor(self.log_betas, t, x.shape)
                # v = -1 gives beta_tilde_t, v = +1 gives beta_t.
                frac = (model_var_values + 1) / 2
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        elif self.model_var_type == ModelVarType.FIXED_LARGE:
            model_variance = _extract_into_tensor(self.fixed_large_variance, t, x.shape)
            model_log_variance = _extract_into_tensor(self.fixed_large_log_variance, t, x.shape)
        else:
            model_variance = _extract_into_tensor(self.posterior_variance, t, x.shape)
            model_log_variance = _extract_into_tensor(
                self.posterior_log_variance_clipped, t, x.shape
            )

        def process_xstart(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(
                self._predict_xstart_from_xprev(x_t=x, t=t, xprev=model_output)
            )
            model_mean = model_output
        else:
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(model_output)
            else:
                pred_xstart = process_xstart(
                    self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output)
                )
            model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)

        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
            "extra": extra,
        }

    def _predict_xstart_from_eps(self, x_t, t, eps):
        """x_0 = x_t / sqrt(alpha_bar_t) - sqrt(1 / alpha_bar_t - 1) eps."""
        if x_t.shape != eps.shape:
            raise ValueError("x_t and eps must have the same shape")
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        """eps = (x_t / sqrt(alpha_bar_t) - x_0) / sqrt(1 / alpha_bar_t - 1)."""
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart
        ) / _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        """Invert the posterior mean: x_0 = (mu - coef2 x_t) / coef1."""
        return (
            _extract_into_tensor(1.0 / self.posterior_mean_coef1, t, x_t.shape) * xprev
            - _extract_into_tensor(
                self.posterior_mean_coef2 / self.posterior_mean_coef1, t, x_t.shape
            )
            * x_t
        )

    # ------------------------------------------------------------------- guidance

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Shift the mean by Sigma * grad log p(y | x_t) (Sohl-Dickstein et al. 2015).

        ``cond_fn(x, t, **model_kwargs)`` returns that gradient.
        """
        gradient = self._call_model(cond_fn, x, t, model_kwargs)
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Guide through the score: eps <- eps - sqrt(1 - alpha_bar_t) grad log p(y | x_t).

        This is the conditioning of Song et al. (2020), which DDIM needs since it
        does not use the mean of p directly.
        """
        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * self._call_model(cond_fn, x, t, model_kwargs)
        out = p_mean_var.copy()
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    # ------------------------------------------------------------ single steps

    def p_sample(
        self,
        model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs: Optional[dict] = None,
        generator: GeneratorArg = None,
        noise: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """One ancestral (DDPM) step: x_{t-1} = mu + [t > 0] exp(log Sigma / 2) z.

        :param generator: source of z, see :func:`randn_rows`.
        :param noise: z itself; when given, nothing is drawn.
        :return: dict with ``sample`` (x_{t-1}) and ``pred_xstart``.
        """
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
        )
        # Drawn at every step, t = 0 included, so the RNG advances as in ADM.
        if noise is None:
            noise = randn_rows(x.shape, generator, device=x.device, dtype=x.dtype)
        nonzero_mask = _nonzero_mask(t, x.dim())
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(
        self,
        model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs: Optional[dict] = None,
        eta: float = 0.0,
        generator: GeneratorArg = None,
        noise: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """One DDIM step (Song et al. 2021, eq. 12).

        x_{t-1} = sqrt(alpha_bar_{t-1}) x_0 + sqrt(1 - alpha_bar_{t-1} - sigma^2) eps
        + [t > 0] sigma z, with sigma = eta sqrt((1 - alpha_bar_{t-1}) / (1 - alpha_bar_t))
        sqrt(1 - alpha_bar_t / alpha_bar_{t-1}). eta = 0 is the deterministic
        sampler; eta = 1 has the DDPM posterior variance.

        eps is re-derived from the (clipped) x_0 estimate, so clipping is
        reflected in both terms, as in ADM. z is drawn at every step even when
        eta = 0, so the RNG advances as in ADM; it only matters for eta > 0.
        """
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
        )
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])

        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = _extract_into_tensor(self.alphas_cumprod_prev, t, x.shape)
        sigma = (
            eta
            * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        if noise is None:
            noise = randn_rows(x.shape, generator, device=x.device, dtype=x.dtype)
        mean_pred = (
            out["pred_xstart"] * torch.sqrt(alpha_bar_prev)
            + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        )
        sample = mean_pred + _nonzero_mask(t, x.dim()) * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self,
        model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs: Optional[dict] = None,
        eta: float = 0.0,
    ) -> Dict[str, torch.Tensor]:
        """One step of the DDIM ODE run forward in time, x_t -> x_{t+1} (inversion)."""
        if eta != 0.0:
            raise ValueError("the reverse ODE exists only for the deterministic path, eta = 0")
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
        )
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = _extract_into_tensor(self.alphas_cumprod_next, t, x.shape)
        mean_pred = (
            out["pred_xstart"] * torch.sqrt(alpha_bar_next)
            + torch.sqrt(1 - alpha_bar_next) * eps
        )
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    # ---------------------------------------------------------------- sampling loops

    def _sample_loop_progressive(
        self,
        step: Callable[..., Dict[str, torch.Tensor]],
        model,
        shape,
        noise,
        device,
        progress: bool,
        generator: GeneratorArg,
        step_listener: Optional[StepListener],
        step_kwargs: dict,
    ) -> Iterator[Dict[str, torch.Tensor]]:
        """Run ``step`` from t = T-1 down to 0, yielding each step's output."""
        if not isinstance(shape, (tuple, list)):
            raise TypeError("shape must be a tuple or list")
        if generator is not None and not isinstance(generator, torch.Generator):
            generator = list(generator)
            if len(generator) != shape[0]:
                raise ValueError(
                    f"got {len(generator)} generators for a batch of {shape[0]}; "
                    "pass one generator per row"
                )
        device = _resolve_device(model, noise, device)
        img = noise if noise is not None else randn_rows(shape, generator, device=device)

        indices = list(range(self.num_timesteps))[::-1]
        num_steps = len(indices)
        iterator = indices
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(indices)
        for step_index, i in enumerate(iterator):
            # filled on the device: torch.tensor(list, device=cuda) is a blocking host copy
            t = torch.full((shape[0],), i, dtype=torch.int64, device=device)
            if step_listener is not None:
                step_listener(step_index, num_steps)
            with torch.no_grad():
                out = step(model, img, t, generator=generator, **step_kwargs)
            yield out
            img = out["sample"]

    def p_sample_loop_progressive(
        self,
        model,
        shape,
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs: Optional[dict] = None,
        device=None,
        progress: bool = False,
        generator: GeneratorArg = None,
        step_listener: Optional[StepListener] = None,
    ) -> Iterator[Dict[str, torch.Tensor]]:
        """Like :meth:`p_sample_loop`, yielding the :meth:`p_sample` dict of every step."""
        return self._sample_loop_progressive(
            self.p_sample, model, shape, noise, device, progress, generator, step_listener,
            dict(clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
                 model_kwargs=model_kwargs),
        )

    def p_sample_loop(
        self,
        model,
        shape,
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs: Optional[dict] = None,
        device=None,
        progress: bool = False,
        generator: GeneratorArg = None,
        step_listener: Optional[StepListener] = None,
    ) -> torch.Tensor:
        """Ancestral (DDPM) sampling over all of this diffusion's steps.

        :param model: any callable ``model(x, t, **model_kwargs)``, called once per step.
        :param shape: ``(N, C, H, W)`` of the samples.
        :param noise: x_T; drawn from ``generator`` when None.
        :param clip_denoised: clamp each x_0 estimate to [-1, 1].
        :param denoised_fn: applied to each x_0 estimate before clipping.
        :param cond_fn: gradient of log p(y | x_t), for classifier guidance.
        :param model_kwargs: extra keyword arguments for the model (e.g. ``y``).
        :param device: device of the samples; default: the noise's, else the model's, else CPU.
        :param progress: show a tqdm bar.
        :param generator: ``None`` uses the global RNG exactly as ADM/DiT do
            (``torch.randn`` for x_T, ``torch.randn_like`` at each step); a
            ``torch.Generator`` is used for all draws; a list of N generators
            makes row i's x_T and per-step noise come from ``generator[i]``
            alone, so a sample does not depend on its batch neighbours.
        :param step_listener: called as ``step_listener(step_index, num_steps)``
            right before the model is evaluated at each step; ``step_index``
            runs 0 .. num_steps - 1 in sampling order (0 = noisiest step). A
            caching engine uses it to know which step the next model call
            belongs to.
        :return: the final x_0 batch.
        """
        final = None
        for final in self.p_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress,
            generator=generator, step_listener=step_listener,
        ):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(
        self,
        model,
        shape,
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs: Optional[dict] = None,
        device=None,
        progress: bool = False,
        eta: float = 0.0,
        generator: GeneratorArg = None,
        step_listener: Optional[StepListener] = None,
    ) -> Iterator[Dict[str, torch.Tensor]]:
        """Like :meth:`ddim_sample_loop`, yielding the :meth:`ddim_sample` dict of every step."""
        return self._sample_loop_progressive(
            self.ddim_sample, model, shape, noise, device, progress, generator, step_listener,
            dict(clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
                 model_kwargs=model_kwargs, eta=eta),
        )

    def ddim_sample_loop(
        self,
        model,
        shape,
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs: Optional[dict] = None,
        device=None,
        progress: bool = False,
        eta: float = 0.0,
        generator: GeneratorArg = None,
        step_listener: Optional[StepListener] = None,
    ) -> torch.Tensor:
        """DDIM sampling over all of this diffusion's steps; arguments as :meth:`p_sample_loop`.

        :param eta: 0 for the deterministic DDIM sampler, 1 for DDPM-like noise.
        """
        final = None
        for final in self.ddim_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress,
            eta=eta, generator=generator, step_listener=step_listener,
        ):
            pass
        return final["sample"]

    # ------------------------------------------------------------------- training

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """The L_vlb term at step t, in bits per dimension.

        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the decoder
        NLL -log p(x_0 | x_1) at t = 0; bits make it comparable with papers.
        :return: dict with ``output`` (shape [N]) and ``pred_xstart``.
        """
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(
            x_start=x_start, x_t=x_t, t=t
        )
        out = self.p_mean_variance(
            model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs
        )
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / np.log(2.0)

        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)

        output = torch.where((t == 0), decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def training_losses(
        self,
        model,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: Optional[dict] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Per-sample training losses at step indices ``t``.

        For MSE losses: ``mse`` is L_simple on the model's mean output; with a
        learned variance ``vb`` is L_vlb computed with the mean output detached
        (IDDPM's L_hybrid: the bound trains only Sigma), and ``loss = mse + vb``.
        For KL losses ``loss`` is L_vlb alone.
        :param noise: the eps used to build x_t; ``torch.randn_like`` when None.
        :return: dict of [N] tensors; always has ``loss``.
        """
        if model_kwargs is None:
            model_kwargs = {}
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)

        terms = {}
        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(
                model=model, x_start=x_start, x_t=x_t, t=t, clip_denoised=False,
                model_kwargs=model_kwargs,
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] *= self.num_timesteps
            return terms

        model_output = self._call_model(model, x_t, t, model_kwargs)
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            B, C = x_t.shape[:2]
            if model_output.shape != (B, C * 2, *x_t.shape[2:]):
                raise ValueError(
                    f"a learned variance needs 2*C = {2 * C} output channels, "
                    f"got output shape {tuple(model_output.shape)}"
                )
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            frozen_out = torch.cat([model_output.detach(), model_var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(
                model=lambda *args, **kwargs: frozen_out,
                x_start=x_start, x_t=x_t, t=t, clip_denoised=False,
            )["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # Keeps the bound's weight as in the original T = 1000 runs.
                terms["vb"] *= self.num_timesteps / 1000.0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            target = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0]
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        else:
            target = noise
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms
