"""Calibration: the trained or fitted part of a method (L2C's router, TokenCache's predictor, …).

A method with such a part declares it as ``calibration = SomeCalibration``, a dataclass subclass
of :class:`Calibration` whose fields are the training settings (declared with
:func:`~tokencache.cache.methods.param`) and whose class attributes name the method parameter
that takes the file (``file_param``), the file format and a title. It implements :meth:`fit`
(train against the frozen model and return tensors), :meth:`random` (a stand-in of the same
shape, for timing where the values do not change the cost) and optionally :meth:`figure`.

Everything else is shared: one command (``tokencache calibrate --method NAME …``) and one
workflow rule serve every such method. :func:`calibrate` writes a file that records the model
(its configuration and a checksum of its weights), the sampler, the method and its variant, the
settings and the training summary; :func:`load_calibration` reads it back and refuses a file
made for another model, sampler or method, so that a mismatch is a clear error rather than
silently wrong caching. The states the fits learn from are the model's own sampling
trajectories of calibration samples (:func:`record_trajectories`, seeds kept apart from the
evaluation seeds), taken batch by batch with :meth:`Trajectories.rows` / :func:`batch_rows`;
:func:`replay_trajectories` runs a recording method over them (TeaCache's fit),
:func:`relaxation_batches` gives the updates of a relaxation fit and :func:`fit_relaxation` is
the one fitting loop (optimizer step, history, log) that L2C's router and TokenCache's
predictors share. All of it is public API (``tokencache.cache``): a plugin's calibration uses
the same pieces.
"""
from __future__ import annotations

import abc
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar, Iterator, NamedTuple, Optional, Union

import torch

from tokencache.cache.methods import validate_params
from tokencache.errors import UserError
from tokencache.io import write_atomic
from tokencache.sampling import Sampler, draw_labels, generate, parse_sampler, sample_generators


class CalibrationError(UserError, ValueError):
    """A calibration file that is missing, malformed, or made for another model, sampler or method."""


@dataclass(frozen=True)
class SamplingSettings:
    """How the calibrated runs sample (the trajectories must be the ones such a run produces)."""

    cfg_scale: float = 1.5
    scale_pow: Optional[float] = None
    clip_denoised: bool = False


@dataclass
class Calibration(abc.ABC):
    """Base of a method's calibration: subclass as a dataclass whose fields are the training settings.

    A subclass must define :meth:`fit` and :meth:`random`; one that does not cannot be created.
    """

    file_param: ClassVar[str] = ""
    format: ClassVar[str] = ""
    title: ClassVar[str] = ""

    def __post_init__(self) -> None:
        validate_params(self)

    @property
    def name(self) -> str:  # prefix of validation messages
        return self.title

    @abc.abstractmethod
    def fit(self, method, model: torch.nn.Module, sampler: Sampler, sampling: SamplingSettings,
            progress: bool = False, log=None) -> tuple[dict, dict]:
        """Train against the frozen ``model``; return (tensors to store, a JSON summary of the training)."""

    @abc.abstractmethod
    def random(self, method, model: torch.nn.Module, sampler: Sampler, generator: torch.Generator) -> dict:
        """Tensors of the right shapes with random values, for timing only."""

    def figure(self, tensors: dict, ax, title: str) -> bool:
        """Draw what was learned on a matplotlib axis; False when there is nothing to show."""
        return False

    def settings(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ---------------------------------------------------------------------- files


def model_fingerprint(model: torch.nn.Module) -> dict:
    """The model's configuration (without its preset name) and a float64 sum of its parameters."""
    config = {k: v for k, v in dict(getattr(model, "config", {})).items() if k != "name"}
    if not config:
        config = {"family": type(model).__name__, "block_count": int(model.block_count),
                  "num_tokens": int(model.num_tokens)}
    with torch.no_grad():
        checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    return {"config": config, "param_sum": checksum}


def save_calibration(path: Union[str, Path], method, model: torch.nn.Module, sampler: Sampler, tensors: dict,
                     training: Optional[dict] = None, settings: Optional[dict] = None,
                     sampling: Optional[SamplingSettings] = None) -> None:
    """Write a calibration file atomically (format, tensors, sampler, model fingerprint, method, training)."""
    calibration = type(method).calibration
    obj = {"format": calibration.format, "tensors": {k: v.detach().cpu() for k, v in tensors.items()},
           "sampler": sampler.name, "model": model_fingerprint(model), "method": method.name,
           "variant": method.calibration_id(), "settings": dict(settings or {}),
           "sampling": asdict(sampling) if sampling is not None else None, "training": dict(training or {})}
    write_atomic(path, obj, "torch")


def load_calibration(method, path: Union[str, Path, None], model: Optional[torch.nn.Module] = None,
                     sampler: Union[Sampler, str, None] = None) -> dict:
    """The tensors of ``method``'s calibration file; with ``model``/``sampler``, checked against them.

    Every problem is a :class:`CalibrationError` in one line naming the file, what it is and
    the command that makes one.
    """
    calibration = type(method).calibration
    command = f"tokencache calibrate --method {method.name}"
    if not path:
        raise CalibrationError(f"{method.name}: set {calibration.file_param}=PATH (make one with `{command}`)")
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"{calibration.file_param} file {path} does not exist (make one with `{command}`)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CalibrationError(f"{calibration.file_param} file {path} cannot be read: {type(exc).__name__}") from exc
    if not isinstance(obj, dict) or obj.get("format") != calibration.format:
        raise CalibrationError(f"{path} is not a tokencache {calibration.title} (format {calibration.format})")
    if obj.get("variant") != method.calibration_id():
        raise CalibrationError(f"{path} was made for {obj.get('variant')}, this run needs {method.calibration_id()} "
                               f"(make one with `{command}`)")
    if sampler is not None:
        name = sampler if isinstance(sampler, str) else sampler.name
        if parse_sampler(name).name != obj["sampler"]:
            raise CalibrationError(f"{calibration.file_param} {path} was made for sampler {obj['sampler']}, "
                                   f"this run uses {name}")
    if model is not None:
        want, have = obj["model"], model_fingerprint(model)
        if want["config"] != have["config"]:
            raise CalibrationError(f"{calibration.file_param} {path} was made for model "
                                   f"{json.dumps(want['config'], sort_keys=True)}, not "
                                   f"{json.dumps(have['config'], sort_keys=True)}")
        if not math.isclose(want["param_sum"], have["param_sum"], rel_tol=1e-6, abs_tol=1e-6):
            raise CalibrationError(f"{calibration.file_param} {path} was made for other weights of this architecture "
                                   f"(parameter checksum {want['param_sum']:.6g} vs {have['param_sum']:.6g})")
    return obj["tensors"]


def read_calibration_file(path: Union[str, Path]) -> dict:
    """The whole stored record of a calibration file (for reports), without checks."""
    return torch.load(path, map_location="cpu", weights_only=True)


def calibrate(method, model: torch.nn.Module, sampler: Union[Sampler, str], settings: Optional[Calibration] = None,
              sampling: SamplingSettings = SamplingSettings(), out: Union[str, Path, None] = None,
              progress: bool = False, log=None) -> dict:
    """Fit ``method``'s calibration for ``model`` (frozen) and ``sampler``; write it to ``out`` if given.

    Returns the training summary with the file and sampler. The model's weights and
    ``requires_grad`` flags are left as they were; it must have no cache context attached.
    """
    calibration = type(method).calibration
    if calibration is None:
        raise ValueError(f"{method.name} has nothing to calibrate")
    settings = settings if settings is not None else calibration()
    sampler = parse_sampler(sampler) if isinstance(sampler, str) else sampler
    if getattr(model, "cache_context", None) is not None:
        raise RuntimeError("calibrate: detach the model's cache context first")
    frozen = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        tensors, training = settings.fit(method, model, sampler, sampling, progress=progress, log=log)
    finally:
        model.cache_context = None
        for p, flag in zip(model.parameters(), frozen):
            p.requires_grad_(flag)
    if out is not None:
        save_calibration(out, method, model, sampler, tensors, training, settings.settings(), sampling)
    return {"file": None if out is None else str(out), "method": method.name, "variant": method.calibration_id(),
            "sampler": sampler.name, **settings.settings(), **training}


def write_random_calibration(method, model: torch.nn.Module, sampler: Union[Sampler, str], path: Union[str, Path],
                             seed: int = 0) -> str:
    """A calibration file of random values for ``method`` (timing only; the file says so)."""
    calibration = type(method).calibration
    sampler = parse_sampler(sampler) if isinstance(sampler, str) else sampler
    tensors = calibration().random(method, model, sampler, torch.Generator().manual_seed(seed))
    save_calibration(path, method, model, sampler, tensors, {"random": True, "seed": seed, "purpose": "latency only"})
    return str(path)


# ---------------------------------------------------------------------- trajectories


class Trajectories(NamedTuple):
    """The model's inputs at every step of full sampling of M calibration samples.

    ``x[k]`` (M, c, C, H, W) and ``y`` (M, c), c = rows per sample (2 with CFG batching: the
    conditional and the null-label row); ``t[k]`` the original timestep of step k (a scalar).
    Unpacks as ``x, t, y``.
    """

    x: list
    t: list
    y: torch.Tensor

    @property
    def num_samples(self) -> int:
        return len(self.y)

    def rows(self, step: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The model call (x, t, y) of step ``step`` for samples ``index``, rows as the model saw them."""
        y = batch_rows(self.y, index)
        return batch_rows(self.x[step], index), self.t[step].expand(len(y)), y


def record_trajectories(model, sampler: Sampler, sampling: SamplingSettings, seed: int, num_samples: int,
                        batch_size: int, progress: bool) -> Trajectories:
    """The model's inputs at every step of full sampling of calibration samples ``(seed, 0…M−1)``.

    Returns :class:`Trajectories` (x, t, y): x[k] (M, c, C, H, W) and y (M, c) with c = rows per
    sample (2 with CFG batching: conditional, null), t[k] the original timestep of step k. The
    samples are drawn as any sampling run draws them (labels and noise from (seed, index)), so
    keep ``seed`` apart from the evaluation seeds.
    """
    from tqdm import tqdm

    steps_x: list[list[torch.Tensor]] = [[] for _ in range(sampler.steps)]
    steps_t: list[torch.Tensor] = [None] * sampler.steps
    labels_rows: list[torch.Tensor] = []
    state = {"step": 0}
    original_forward = model.forward

    def recording_forward(x, t, y, *args, **kwargs):
        copies = x.shape[0] // state["batch"]
        steps_x[state["step"]].append(x.detach().reshape(copies, state["batch"], *x.shape[1:]).transpose(0, 1))
        steps_t[state["step"]] = t[0].detach()
        if state["step"] == 0:
            labels_rows.append(y.detach().reshape(copies, state["batch"]).transpose(0, 1))
        return original_forward(x, t, y, *args, **kwargs)

    def listener(step, num_steps):
        state["step"] = step

    bar = tqdm(total=num_samples, desc="calibration trajectories", unit="img", disable=not progress)
    own_forward = model.__dict__.get("forward")
    model.forward = recording_forward
    try:
        for lo in range(0, num_samples, batch_size):
            indices = list(range(lo, min(lo + batch_size, num_samples)))
            gens = sample_generators(seed, indices)
            state["batch"] = len(indices)
            generate(model, sampler, draw_labels(gens, model.num_classes), gens, cfg_scale=sampling.cfg_scale,
                     scale_pow=sampling.scale_pow, step_listener=listener, clip_denoised=sampling.clip_denoised)
            bar.update(len(indices))
    finally:
        if own_forward is None:
            del model.forward
        else:
            model.forward = own_forward
        bar.close()
    return Trajectories([torch.cat(chunks) for chunks in steps_x], steps_t, torch.cat(labels_rows))


def batch_rows(per_sample: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(M, c, ...) → the batch (c·b, ...) of samples ``index``, copies stacked as the model saw them."""
    picked = per_sample[index].transpose(0, 1)
    return picked.reshape(-1, *picked.shape[2:])


def sample_batches(num_samples: int, batch_size: int, device) -> Iterator[torch.Tensor]:
    """The sample indices 0…M−1 in consecutive batches of ``batch_size`` (index tensors on ``device``)."""
    for lo in range(0, num_samples, batch_size):
        yield torch.arange(lo, min(lo + batch_size, num_samples), device=device)


class Replayed(NamedTuple):
    """One model call of :func:`replay_trajectories`: the samples, the step k, the output, the engine."""

    index: torch.Tensor
    step: int
    output: torch.Tensor
    engine: "CacheEngine"  # noqa: F821 (what the method stored: e.g. engine.span_residual)


def replay_trajectories(model, sampler: Sampler, method, trajectories: Trajectories,
                        batch_size: int) -> Iterator[Replayed]:
    """Run the model on every recorded step of every batch of samples with ``method`` attached.

    Yields a :class:`Replayed` after each call, batch by batch and, in each batch, step by step
    from k = 0 (a new generation for the engine), so the method (a recorder: it computes
    everything) reads what it needs at every step — TeaCache's fit reads the modulated input of
    block 0 this way, and the block stack's residual from ``engine.span_residual``. Runs without
    gradients.
    """
    from tokencache.cache.engine import CacheEngine

    engine = CacheEngine(model, method, sampler)
    with torch.no_grad():
        for index in sample_batches(trajectories.num_samples, batch_size, trajectories.y.device):
            for k in range(sampler.steps):
                x, t, y = trajectories.rows(k, index)
                engine.attach()
                try:
                    engine.begin_step(k)
                    out = model(x, t, y)
                finally:
                    engine.detach()
                yield Replayed(index, k, out, engine)


# ---------------------------------------------------------------------- the relaxation loop


class RelaxationBatch:
    """One update of a relaxation fit: samples ``index`` at sampling step ``step`` (its predecessor full).

    ``target`` is the full model's output at ``step``; :meth:`relaxed` runs the model at ``step``
    with the relaxation method deciding, on a cache the full step ``step − 1`` filled.
    """

    def __init__(self, engine, step: int, x_now, t_now, y, target):
        self.engine, self.step = engine, step
        self.x_now, self.t_now, self.y, self.target = x_now, t_now, y, target

    def relaxed(self) -> torch.Tensor:
        engine = self.engine
        engine.attach()
        try:
            engine.begin_step(self.step)
            return engine.model(self.x_now, self.t_now, self.y)
        finally:
            engine.detach()


def relaxation_batches(model, sampler: Sampler, relaxation, trajectories: Trajectories, updates: int,
                       batch_size: int, num_samples: int, generator: torch.Generator, pick_step, progress: bool,
                       desc: str) -> Iterator[RelaxationBatch]:
    """The update loop the relaxation-trained calibrations share (L2C's router, TokenCache's predictor).

    For each of ``updates`` updates: ``pick_step()`` gives a sampling step k ≥ 1 (``batch.step`` is
    its :class:`~tokencache.cache.steps.Step`, with the count-down index); ``batch_size``
    calibration samples are drawn from ``num_samples``; the full model runs at k − 1 through an
    engine carrying ``relaxation`` (every branch computed and stored) and, without the engine,
    at k for the target; the caller computes the relaxed output, the loss and the update
    (:func:`fit_relaxation` does all of that). ``relaxation.relaxed_step`` is set to k before
    the full step, so the relaxation knows which step to blend. The progress bar shows
    ``batch.loss`` when the caller sets it.
    """
    from tqdm import tqdm

    from tokencache.cache.engine import CacheEngine

    device = next(model.parameters()).device
    engine = CacheEngine(model, relaxation, sampler)
    bar = tqdm(range(updates), desc=desc, disable=not progress)
    for _ in bar:
        step = engine.steps[pick_step()]
        index = torch.randperm(num_samples, generator=generator)[:batch_size].to(device)
        x_prev, t_prev, y = trajectories.rows(step - 1, index)
        x_now, t_now, _ = trajectories.rows(step, index)
        with torch.no_grad():
            target = model(x_now, t_now, y)
            engine.attach()
            try:
                engine.reset()
                relaxation.relaxed_step = step
                engine.begin_step(step - 1)
                model(x_prev, t_prev, y)
            finally:
                engine.detach()
        batch = RelaxationBatch(engine, step, x_now, t_now, y, target)
        yield batch
        if getattr(batch, "loss", None) is not None:
            bar.set_postfix(loss=f"{batch.loss:.3g}")


class FitHistory(list):
    """The entries of a fit, one dict per update (``update``, then the loss terms as floats)."""

    def first_mean(self, key: str, count: int) -> float:
        """Mean of ``key`` over the first ``count`` updates (the start of the loss curve)."""
        return sum(h[key] for h in self[:count]) / count

    def last_mean(self, key: str, count: int) -> float:
        """Mean of ``key`` over the last ``count`` updates (the loss the fit ends at, less noisy than one)."""
        return sum(h[key] for h in self[-count:]) / count


def fit_relaxation(model, sampler: Sampler, relaxation, trajectories: Trajectories, optimizer, loss_terms,
                   *, updates: int, batch_size: int, num_samples: int, generator: torch.Generator, pick_step,
                   progress: bool, desc: str, log=None, after_update=None) -> FitHistory:
    """The fitting loop of the relaxation-trained calibrations (L2C's router, TokenCache's predictors).

    For every :class:`RelaxationBatch` of :func:`relaxation_batches`: ``loss_terms(batch)`` returns
    an ordered dict with the tensor to minimise under ``"loss"`` and any other terms to record
    (tensors or numbers); the loop takes one ``optimizer`` step on it (gradients cleared first),
    calls ``after_update()`` (e.g. a clamp), and records ``{"update": u, **terms}`` with tensors
    read as floats — in the returned :class:`FitHistory`, one JSON line per update in ``log``
    and the last loss on the progress bar.
    """
    history = FitHistory()
    for update, batch in enumerate(relaxation_batches(model, sampler, relaxation, trajectories, updates, batch_size,
                                                      num_samples, generator, pick_step, progress, desc)):
        terms = loss_terms(batch)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        if after_update is not None:
            after_update()
        entry = {"update": update, **{key: value.item() if torch.is_tensor(value) else value
                                      for key, value in terms.items()}}
        batch.loss = entry["loss"]
        history.append(entry)
        if log is not None:
            log.write(json.dumps(entry) + "\n")
    return history
