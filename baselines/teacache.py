"""``teacache``: TeaCache, timestep-embedding-aware cache (Liu et al., CVPR 2025, arXiv 2411.19108).

**Source**: ali-vilab/TeaCache @ 7c10efc4702c6b619f47805f7abe4a7a08085aa0; ``path:line`` at that
commit. The integrations closest to DiT (adaLN, CFG as one doubled batch) are the paper's
VideoSys experiments ``eval/teacache/experiments/latte.py`` (DDIM-50) and ``opensora.py``; FLUX
(``TeaCache4FLUX/teacache_flux.py``) has the same rule with a call counter.

**The rule.** Every step computes block 0's timestep-modulated input
m = norm1(x)·(1 + scale_msa) + shift_msa from the embedded input x and block 0's modulation
(latte.py:170–175, opensora.py:66–72, teacache_flux.py:106–108). The first and the last step
compute and set the accumulator to 0 (latte.py:176–178, by timestep; teacache_flux.py:109–111,
by call count). Every other step adds the rescaled relative L1 change

    acc += poly1d(c)( (mean|m − m_prev| / mean|m_prev|).item() )

(latte.py:180–182: float32 means, their ratio read as a Python float, the degree-4 polynomial
``np.poly1d`` evaluated in float64), and skips the blocks iff ``acc < δ`` (strict, :183–184);
otherwise it computes and sets acc = 0, discarding this step's increment (:185–187). m_prev is
overwritten on every step, skipped or not (:188), so each change is between consecutive steps. A
computed step stores the residual of the whole block stack, out_{L−1} − x (:206, 322); a skip
returns x + that residual (:190–192), and the final layer always runs with this step's
conditioning. Here: ``Span(0, L−1, reuse=…)``, the stack's residual re-added to the current x.

**Defaults.** δ = 0.1, the "slow" setting of the DiT-like integrations Latte and Open-Sora
(latte.py:504, opensora.py:215; "fast" 0.2 at latte.py:515, opensora.py:226). Other models'
defaults: FLUX 0.6 (teacache_flux.py:323), HunyuanVideo 0.15 (teacache_sample_video.py:222),
Wan2.1 0.2 (teacache_generate.py:735–738). The testbed sweeps δ: a fitted polynomial has its own
scale, so δ means something else on every model.
``ret_steps`` / ``final_steps``: the first / last steps always computed, 1 and 1 as in every
integration; Wan2.1's ``--use_ret_steps`` is 5 and 0 (``TeaCache4Wan2.1/teacache_generate.py``
886–894, counted there in calls of 2 per step).

**Coefficients** (the calibration, ``tokencache calibrate --method teacache``). The published
polynomials are fitted to other models (Latte's at latte.py:180, Open-Sora's at opensora.py:77) and
the repository has no fitting script. The maintainer's description
(https://github.com/ali-vilab/TeaCache/issues/2, 2024-12-12/16): the modulated inputs and the model
outputs of full sampling runs of 70 prompts, every step, fitted with ``np.polyfit(x, y, 4)``,
x the relative L1 change of the modulated input, y that of the model output. Here x and y are taken
per calibration sample between consecutive steps of the model's own full trajectories (seed apart
from the evaluation seeds), y of the raw network output of the sample's rows (eps and variance
channels, before the guidance combines them; ``target="residual"``: of the block stack's residual
instead, the quantity that is reused), all steps pooled, degree 4. The file records the fit's R² and
RMS error (``resolved()`` shows them) and its points (the calibration figure). As in the official
code, nothing bounds the polynomial: a quartic fit can be negative or decreasing over part of the
range it was fitted on, and then a small change lowers the accumulator.

**What is ours.**

* Per sample instead of per batch: the official mean runs over the whole batch tensor (for one
  sample with CFG batching: both its rows). Here every sample has its own m_prev, accumulator and
  decision, the means taken over its own rows (conditional and null-label rows together;
  ``cfg="separate"``: each row alone, as Wan2.1's separate cond/uncond calls). The arithmetic is
  otherwise the official one: float32 means and ratio, then float64 for the polynomial (Horner, as
  ``np.polyval``; leading zero coefficients dropped, as ``np.poly1d``) and the accumulator.
* The modulated input on DiT is block 0's attention input, modulate(norm1(x_embed + pos_embed),
  shift_msa, scale_msa) with the shift and scale from block 0's adaLN of c = t_emb + y_emb (so it
  also carries the class label, which DiT conditions on through adaLN); on MDTv2 the same at the
  first encoder block. Each step computes it once more than the model does.
* The coefficients are fitted per backbone and sampler (a file is checked against both), and
  per decision unit: ``cfg="separate"`` needs its own file (calibration ``teacache-per-row``).
* First and last step by the sampling step index (the call-counter form).

Overhead counters (per batch row): ``signal_modulation`` — block 0's adaLN Linear(D, 6D) on c and
the LayerNorm of its N·D input (6·D² + 4·N·D); ``modulate_values`` — the modulation's multiply and
add (2 per value); ``signal_values`` — values compared (difference and two absolute sums, 3 per
value). The polynomial is a few scalar operations per sample and is not counted. The signal is not
declared ``traced_overhead``: a trace of the step (fvcore) keeps the adaLN matmul and LayerNorm
only on steps where the rows split (the engine's row selection then depends on them); a step
whose rows all agree feeds them only to the host's decision, and the trace drops them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import numpy as np
import torch

from tokencache.baselines._scores import RELATIVE_L1_MACS, relative_l1
from tokencache.cache import (
    CacheMethod,
    Calibration,
    Span,
    load_calibration,
    param,
    record_trajectories,
    register_method,
    replay_trajectories,
    sample_view,
)

TARGETS = ("output", "residual")
CFG_MODES = ("together", "separate")


def trim_leading_zeros(coefficients) -> list[float]:
    """The coefficients as ``np.poly1d`` keeps them: leading zeros dropped, [0.0] if nothing is left."""
    values = [float(c) for c in coefficients]
    while values and values[0] == 0.0:
        values.pop(0)
    return values or [0.0]


def polyval(coefficients, x: torch.Tensor) -> torch.Tensor:
    """``np.polyval`` in float64, elementwise: y = 0; y = y·x + c for c highest power first."""
    x = x.double()
    y = torch.zeros_like(x)
    for c in coefficients:
        y = y * x + c
    return y


def fit_polynomial(x: np.ndarray, y: np.ndarray, degree: int) -> dict:
    """``np.polyfit(x, y, degree)`` on the finite pairs, with R² and the RMS error of the fit."""
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]
    if x.size <= degree:
        raise ValueError(f"teacache: {x.size} finite calibration points cannot fit a degree-{degree} polynomial")
    coefficients = np.polyfit(x, y, degree)
    error = y - np.poly1d(coefficients)(x)
    spread = float(((y - y.mean()) ** 2).sum())
    return {"coefficients": coefficients, "r2": 1.0 - float((error**2).sum()) / spread if spread > 0 else math.nan,
            "rmse": float(np.sqrt((error**2).mean())), "points": int(x.size), "dropped": int((~finite).sum()),
            "x_range": [float(x.min()), float(x.max())], "y_range": [float(y.min()), float(y.max())]}


class _SignalRecorder(CacheMethod):
    """Calibration-time: records block 0's modulated input; computes everything. With
    ``stack_residual`` the whole stack runs as one computed span, so the engine keeps its residual
    out_{L−1} − x (``engine.span_residual(0, L−1)``)."""

    name = "teacache-recorder"

    def __init__(self, stack_residual: bool):
        self.stack_residual = stack_residual
        self.modulated = None

    def params(self) -> dict:
        return {}

    def block_action(self, step, block, inputs):
        if block != 0:
            return None
        self.modulated = inputs.attention_input()
        return Span(0, self.info.block_count - 1, reuse=False) if self.stack_residual else None


@dataclass
class TeaCacheCoefficients(Calibration):
    """TeaCache's rescaling polynomial, fitted to the model's own full trajectories."""

    file_param: ClassVar[str] = "coefficients"
    format: ClassVar[str] = "tokencache-teacache-coefficients/1"
    title: ClassVar[str] = "TeaCache coefficients"
    integer_axes: ClassVar[bool] = False
    num_samples: int = param(32, "calibration trajectories (samples (seed, 0…M−1); the official fit used 70 "
                                 "prompts)", min=1)
    batch_size: int = param(16, "calibration samples per batch", min=1)
    degree: int = param(4, "degree of the polynomial (official 4)", min=1)
    target: str = param("output", "y: relative L1 change of the model output (as the maintainers describe) or of "
                                  "the block stack's residual", choices=TARGETS)
    seed: int = param(3, "calibration seed: keep it apart from the evaluation seeds", min=0)

    def points(self, model, sampler, sampling, progress=False, per_row=False):
        """(x, y) (M, T−1) float64: per sample and step k ≥ 1, the relative L1 change from step k − 1 of the
        modulated input (x) and of the target (y), each over the sample's rows (``per_row``: one pair per
        row, (rows·M, T−1), as a method with ``cfg="separate"`` measures)."""
        trajectories = record_trajectories(model, sampler, sampling, self.seed, self.num_samples, self.batch_size,
                                           progress)
        rows = 1 if per_row else trajectories.y.shape[1]
        recorder = _SignalRecorder(stack_residual=self.target == "residual")
        last = int(model.block_count) - 1
        x_points, y_points = [], []
        for replayed in replay_trajectories(model, sampler, recorder, trajectories, self.batch_size):
            if replayed.step == 0:
                previous, x_steps, y_steps = None, [], []
            target = replayed.output if self.target == "output" else replayed.engine.span_residual(0, last)
            current = (sample_view(recorder.modulated, rows), sample_view(target, rows))
            if previous is not None:
                x_steps.append(relative_l1(current[0], previous[0]).double())
                y_steps.append(relative_l1(current[1], previous[1]).double())
            previous = current
            if replayed.step == sampler.steps - 1:
                x_points.append(torch.stack(x_steps, dim=1).cpu())
                y_points.append(torch.stack(y_steps, dim=1).cpu())
        return torch.cat(x_points), torch.cat(y_points)

    def fit(self, method, model, sampler, sampling, progress=False, log=None):
        if sampler.steps < 2:
            raise ValueError(f"teacache: {sampler.name} has no pair of consecutive steps to fit on")
        x, y = self.points(model, sampler, sampling, progress, per_row=method.cfg == "separate")
        result = fit_polynomial(x.numpy(), y.numpy(), self.degree)
        coefficients = torch.tensor(result["coefficients"], dtype=torch.float64)
        tensors = {"coefficients": coefficients, "points_x": x, "points_y": y,
                   "fit_r2": torch.tensor(result["r2"], dtype=torch.float64),
                   "fit_rmse": torch.tensor(result["rmse"], dtype=torch.float64)}
        summary = {"coefficients": coefficients.tolist(), "r2": result["r2"], "rmse": result["rmse"],
                   "points": result["points"], "dropped_points": result["dropped"], "x_range": result["x_range"],
                   "y_range": result["y_range"], "target": self.target, "degree": self.degree}
        return tensors, summary

    def random(self, method, model, sampler, generator):
        """The identity x ↦ x (coefficients [0, 0, 0, 1, 0]): the raw relative L1 change is accumulated."""
        return {"coefficients": torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0], dtype=torch.float64)}

    def figure(self, tensors, ax, title):
        if "points_x" not in tensors:
            return False
        x, y = tensors["points_x"].double().flatten().numpy(), tensors["points_y"].double().flatten().numpy()
        finite = np.isfinite(x) & np.isfinite(y)
        x, y = x[finite], y[finite]
        ax.scatter(x, y, s=4, alpha=0.3, color="tab:blue", label="calibration steps")
        line = np.linspace(x.min(), x.max(), 200)
        fitted = np.poly1d(tensors["coefficients"].double().numpy())
        r2, rmse = float(tensors["fit_r2"]), float(tensors["fit_rmse"])
        ax.plot(line, fitted(line), color="tab:red", label=f"degree-{len(tensors['coefficients']) - 1} fit, "
                                                            f"R² {r2:.3f}, RMSE {rmse:.3g}")
        ax.set(title=title, xlabel="rel. L1 change of the modulated input", ylabel="rel. L1 change of the target")
        ax.legend(fontsize=7)
        return True


@dataclass(frozen=True)
class TeaPlan:
    polynomial: tuple  # the fitted coefficients, highest power first, leading zeros dropped (np.poly1d)
    fit_quality: dict  # fit_r2, fit_rmse as the file records them


@dataclass
class TeaState:
    previous: Optional[torch.Tensor] = None  # (S, r·N·D): the previous step's modulated input per sample
    accumulated: Optional[torch.Tensor] = None  # (S,) float64
    history: list = field(default_factory=list)  # per step: {"step", "rel" (B,) float64 or None, "reuse" (B,)}


@register_method
@dataclass
class TeaCache(CacheMethod):
    """Accumulate the rescaled relative L1 change of block 0's modulated input; reuse the stack's residual below δ."""

    name = "teacache"
    host_sync = True
    State = TeaState
    calibration = TeaCacheCoefficients
    noop = {"ret_steps": 1_000_000}
    search_space = {"threshold": (0.05, 0.1, 0.2, 0.3, 0.6, 1.0)}  # δ; Latte/Open-Sora 0.1 and 0.2
    coefficients: Optional[str] = param(None, "path of the coefficients file from `tokencache calibrate --method "
                                              "teacache` (required)")
    threshold: float = param(0.1, "δ (rel_l1_thresh): reuse while the accumulated rescaled change stays below "
                                  "(Latte/Open-Sora 0.1 slow, 0.2 fast)", min=0.0)
    ret_steps: int = param(1, "first steps always computed (official 1; Wan2.1 use_ret_steps 5)", min=1)
    final_steps: int = param(1, "last steps always computed (official 1; Wan2.1 use_ret_steps 0)", min=0)
    cfg: str = param("together", "with CFG batching: one decision from both rows of a sample, or one per row",
                     choices=CFG_MODES)

    def plan_for(self, info):
        tensors = load_calibration(self, self.coefficients, info.model, info.sampler_name)
        return TeaPlan(tuple(trim_leading_zeros(tensors["coefficients"].tolist())),
                       {key: float(tensors[key]) for key in ("fit_r2", "fit_rmse") if key in tensors})

    def resolved(self):
        if self.plan is None:
            return self.params()
        return {**self.params(), "polynomial": list(self.plan.polynomial), **self.plan.fit_quality}

    def calibration_id(self):
        """Per-row decisions (``cfg="separate"``) measure other changes: their polynomial is another file."""
        return self.name if self.cfg == "together" else f"{self.name}-per-row"

    def overhead_macs(self, shape):
        n, d = shape.tokens, shape.hidden
        return {"signal_modulation": 6 * d * d + 4 * n * d, "modulate_values": 2, "signal_values": RELATIVE_L1_MACS}

    def forced(self, step: int) -> bool:
        return step < self.ret_steps or step >= self.info.num_steps - self.final_steps

    def block_action(self, step, block, inputs):
        if block != 0:
            return None
        state = self.state
        rows = inputs.rows_per_sample if self.cfg == "together" else 1
        modulated = sample_view(inputs.attention_input(), rows)
        per_row = modulated.shape[1] // rows
        self.count("signal_modulation", 1)
        self.count("modulate_values", per_row)
        samples, device = modulated.shape[0], modulated.device
        if self.forced(step) or state.previous is None:
            state.accumulated = torch.zeros(samples, dtype=torch.float64, device=device)
            reuse, rel = torch.zeros(samples, dtype=torch.bool, device=device), None
        else:
            rel = relative_l1(modulated, state.previous).double()  # .cpu().item() of the float32 ratio
            self.count("signal_values", per_row)
            accumulated = state.accumulated + polyval(self.plan.polynomial, rel)
            reuse = accumulated < self.threshold
            state.accumulated = torch.where(reuse, accumulated, torch.zeros_like(accumulated))
        state.previous = modulated
        state.history.append({"step": step, "rel": None if rel is None else rel.repeat(rows),
                              "reuse": reuse.repeat(rows)})
        return Span(0, self.info.block_count - 1, reuse=reuse.repeat(rows))
