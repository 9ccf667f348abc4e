"""The method API: a caching method is a small dataclass with typed parameters and decision hooks.

A method is a dataclass subclass of :class:`CacheMethod` with a ``name`` and its parameters
declared with :func:`param` (default, one-line doc with the paper's symbol, allowed range)::

    @register_method
    @dataclass
    class EveryOther(CacheMethod):
        \"\"\"Reuse every block's MLP output on odd steps.\"\"\"
        name = "every-other"
        interval: int = param(2, "N: full MLP every N steps", min=1)

        def branch_action(self, step, block, branch):
            return REUSE if branch == "mlp" and step % self.interval else COMPUTE

The engine calls, per attach, :meth:`~CacheMethod.setup` (the model and sampler as a
:class:`ModelInfo`), which stores ``self.info`` and the method's immutable plan ``self.plan =
self.plan_for(info)`` (schedules, per-block ratios: everything derived from the settings and the
model, never changed while sampling); per generation it creates ``self.state = self.State()``
when the method declares a ``State`` class (everything that must start afresh); per step
:meth:`~CacheMethod.begin_step`; per block
:meth:`~CacheMethod.block_action` (its input tensor and the timestep-modulated input are there
to read); per branch :meth:`~CacheMethod.branch_action` (see :mod:`tokencache.cache.actions`);
and :meth:`observe` after a computation if the method defines it. Every hook gets the step as a
:class:`~tokencache.cache.steps.Step`: the sampling index k (the int value), ``step.countdown``
(the official s = T−1−k), ``step.timestep`` and ``step.num_steps``.

Besides decisions, a method declares what the general layers need to know about it, so that
none of them names a method: its ``role`` in comparisons, whether it reads device values on the
host (``host_sync``), the price of its overhead counters (:meth:`~CacheMethod.overhead_macs`),
its resolved settings (:meth:`~CacheMethod.resolved`), a sampler it runs instead
(:meth:`~CacheMethod.transform_sampler`), the parameter values that make it compute everything
(``noop``, for the contract test) and, when it has a trained or fitted part, its
:class:`~tokencache.cache.calibration.Calibration`.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Union

from tokencache.cache.actions import COMPUTE
from tokencache.cache.steps import Step, sampling_steps

#: the roles a method plays in a comparison (plots and tables style and order runs by them)
ROLES = ("reference", "fewer-steps", "cache")


def param(default: Any, doc: str, *, min: Optional[float] = None, max: Optional[float] = None,
          choices: Optional[tuple] = None):
    """A method (or calibration) parameter: its default, a one-line doc (paper symbol first), its range.

    ``min``/``max`` bound numbers (inclusive); ``choices`` lists the allowed values of a string.
    """
    meta = {"doc": doc, "min": min, "max": max, "choices": tuple(choices) if choices else None}
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelInfo:
    """What a method may know about the model and the sampling run it is attached to.

    ``family``: the model class ("DiT", "MDT", "MDTv2"); ``block_count``: blocks in execution
    order; ``num_tokens``/``grid_size``: tokens per image and the side of their square grid;
    ``skip_partners``: long skips as {block that pushes: block that pops} (MDTv2's U; empty for
    DiT); ``sampler_*``: the sampler actually run (``num_steps`` its step count);
    ``timesteps``: the original 0–999 timestep of each sampling step (first = noisiest);
    ``model``: the model itself (for methods that check a learned artefact against it or read
    its weights); ``device``: where its parameters live.
    """

    family: str
    block_count: int
    num_tokens: int
    grid_size: int
    skip_partners: dict
    sampler_name: str
    sampler_loop: str
    num_steps: int
    timesteps: tuple
    model: Any = dataclasses.field(default=None, repr=False, compare=False)
    device: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def steps(self) -> tuple[Step, ...]:
        """The sampler's steps k = 0 … T−1 as :class:`~tokencache.cache.steps.Step` (for plans made in setup)."""
        return sampling_steps(self.num_steps, self.timesteps)


class CacheMethod:
    """Base of every caching method. Subclasses are dataclasses registered by name.

    Class attributes a method may set:

    * ``passthrough = True`` — never changes a branch (the uncached model, fewer steps): the engine leaves
      the model untouched and counts every token;
    * ``role`` — "reference" (the uncached model every method is compared with), "fewer-steps"
      (the step-reduction baseline every cache must beat) or "cache" (the default);
    * ``host_sync = True`` — the method's decisions read device values on the host while
      sampling (a runtime signal); the engine then computes only the rows a per-row mask asks
      for, and latency reports the synchronisation;
    * ``State`` — a class (e.g. a dataclass) instantiated without arguments at the start of
      every generation as ``self.state``: all per-generation memory lives there (None before
      the first generation);
    * ``noop`` — parameter values with which the method computes everything, as the uncached model;
    * ``traced_overhead`` — overhead counters whose work is matrix arithmetic a trace of the
      model sees (a predictor network's layers, an adaLN signal), as opposed to elementwise work;
    * ``variants`` — parameter sets (dicts) that change how the method works, which the contract
      test checks besides the defaults;
    * ``calibration`` — a :class:`~tokencache.cache.calibration.Calibration` subclass when the
      method needs a trained or fitted file;
    * ``search_space`` — the method's strength knobs and a finite set of values for each:
      ``{param: values}``, or ``{(param, param, …): (value tuples)}`` for knobs that move together
      (e.g. TokenCache's K1 ≥ K2); the space is the product over the keys
      (:func:`~tokencache.cache.registry.search_points`). Empty: the method runs at its configured
      settings only.

    Hooks (all optional; :meth:`branch_action` computes everything by default):

    * ``plan_for(info)`` → the method's plan, once per attach, with a :class:`ModelInfo`:
      schedules and ratios derived from the settings and the model, an immutable object (e.g. a
      frozen dataclass) that the hooks and :meth:`resolved` read as ``self.plan`` (None before
      setup); ``setup(info)`` stores ``self.info`` and ``self.plan`` (override it only to check
      the model without planning anything);
    * ``begin_step(step)`` — before the model runs at step ``step`` (a
      :class:`~tokencache.cache.steps.Step`: the int k, 0 = first, noisiest; ``step.countdown``
      s = T−1−k; ``step.timestep``; ``step.num_steps``);
    * ``block_action(step, block, inputs)`` → None or a :class:`~tokencache.cache.actions.Span`
      starting at ``block``; ``inputs`` has ``x`` (the block's input), ``c`` (the conditioning
      vector) and ``attention_input()`` (the timestep-modulated input of its attention);
    * ``branch_action(step, block, branch)`` → an action for branch "attn" or "mlp";
    * ``observe(step, block, branch, *, x, output, attention, rows)`` — after a branch was
      computed (fully or partly); ``output`` is the stored tensor (keep it only if you clone it
      or the engine stores it), ``rows`` the batch rows computed (None: all); a branch computed
      with ``Compute(values=True)`` also passes ``values=`` (its value heads). Looked up only
      when a subclass defines it, so methods that need nothing pay nothing;
    * ``observe_block(step, block, output)`` — after a block ran (or a span handed its output
      on), with the block's output (B, N, D) as the next block receives it; looked up the same way.

    Per generation the engine also sets ``sample_seeds``: the seed of each sample of the batch
    (its ``(seed, index)`` generator's initial seed, in sample order) when the sampling loop
    told it the samples' generators (:func:`tokencache.sampling.generate` does), else None. A
    method that draws random numbers derives its own per-sample streams from them, so that its
    draws never depend on the batch. A method that reads a device value on the host uses
    :meth:`to_host`, which counts the read (``host_syncs``).
    """

    name: ClassVar[str] = ""
    passthrough: ClassVar[bool] = False
    role: ClassVar[str] = "cache"
    host_sync: ClassVar[bool] = False
    State: ClassVar[Optional[type]] = None
    noop: ClassVar[Optional[dict]] = None
    calibration: ClassVar[Optional[type]] = None
    traced_overhead: ClassVar[tuple] = ()
    variants: ClassVar[tuple] = ()
    search_space: ClassVar[dict] = {}
    _record: Optional[Callable[[str, int], None]] = None
    _host_read: Optional[Callable[[], None]] = None
    #: the seeds of this generation's samples (see the class doc), or None
    sample_seeds: Optional[tuple] = None
    #: the model and sampler attached to, the plan derived from them, this generation's state
    #: (all None until the engine sets them; instance attributes, never dataclass fields)
    info: Optional[ModelInfo] = None
    plan: Any = None
    state: Any = None

    def __post_init__(self) -> None:
        validate_params(self)

    # ------------------------------------------------------------------ hooks

    def setup(self, info: ModelInfo) -> None:
        """Once per attach: keep ``info`` and derive the immutable plan (:meth:`plan_for`)."""
        self.info = info
        self.plan = self.plan_for(info)

    def plan_for(self, info: ModelInfo) -> Any:
        """What this method derives from its settings and the model before sampling (None: nothing)."""
        return None

    def begin_step(self, step: Step) -> None:
        pass

    def block_action(self, step: Step, block: int, inputs):
        return None

    def branch_action(self, step: Step, block: int, branch: str):
        return COMPUTE

    # ------------------------------------------------------------------ declarations

    def transform_sampler(self, sampler):
        """The sampler to run instead of ``sampler`` (a :class:`~tokencache.sampling.Sampler`)."""
        return sampler

    def overhead_macs(self, shape) -> dict:
        """MAC-equivalents of one unit of each overhead counter this method records, per batch row.

        ``shape`` is the model's :class:`~tokencache.models.shape.ModelShape`. One
        MAC-equivalent is one elementary multiply-add, or an add that reads a tensor element.
        A counter without a price is reported as unpriced.
        """
        return {}

    def resolved(self) -> dict:
        """The settings actually used after :meth:`setup` (defaults that depend on the sampler filled in)."""
        return self.params()

    def calibration_id(self) -> str:
        """The name of this method's calibration artefact; variants needing another one override it."""
        return self.name

    # ------------------------------------------------------------------ helpers

    def count(self, name: str, amount: int) -> None:
        """Add ``amount`` (per batch row) to the overhead counter ``name`` of the current step."""
        if self._record is not None:
            self._record(name, amount)

    def to_host(self, value):
        """``value.tolist()`` (a device tensor read on the host), counted as one host synchronisation."""
        if self._host_read is not None:
            self._host_read()
        return value.tolist()

    def params(self) -> dict:
        """The parameter values, JSON-serialisable."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


# ---------------------------------------------------------------------- typed parameters


def allowed_types(annotation) -> tuple[tuple[type, ...], bool]:
    """(accepted Python types, None allowed) for a field annotation such as ``int | None``."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = typing.get_args(annotation)
        inner = tuple(a for a in args if a is not type(None))
        return inner, len(inner) < len(args)
    return (annotation,), False


def type_name(annotation) -> str:
    kinds, optional = allowed_types(annotation)
    name = " | ".join(getattr(k, "__name__", str(k)) for k in kinds)
    return f"{name} | None" if optional else name


def range_text(meta: dict) -> str:
    if meta.get("choices"):
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    if meta.get("min") is None and meta.get("max") is None:
        return "any"
    lo = "−∞" if meta.get("min") is None else f"{meta['min']:g}"
    hi = "∞" if meta.get("max") is None else f"{meta['max']:g}"
    return f"{lo} … {hi}"


def validate_params(obj) -> None:
    """Check every field's type and range; a one-line ValueError names the first bad one."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        kinds, optional = allowed_types(hints[f.name])
        meta = f.metadata
        prefix = f"{obj.name}: parameter {f.name}"
        if value is None:
            if optional:
                continue
            raise ValueError(f"{prefix} is required ({type_name(hints[f.name])}: {range_text(meta)})")
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
            setattr(obj, f.name, value)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok:
            raise ValueError(f"{prefix} must be {type_name(hints[f.name])}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{prefix} must be finite, got {value!r}")
        lo, hi, choices = meta.get("min"), meta.get("max"), meta.get("choices")
        if choices and value not in choices:
            raise ValueError(f"{prefix} must be {range_text(meta)}, got {value!r}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ValueError(f"{prefix} must be in {range_text(meta)}, got {value!r}")


def parse_typed(cls: type, owner: str, key: str, raw: str):
    """The text ``raw`` of parameter ``key`` of dataclass ``cls`` as its declared type.

    ``none``/``null`` is None where allowed; bools are ``true``/``false``; numbers are parsed as
    the field's type, so ``router=123`` stays a path and ``interval=3`` an int.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if key not in fields:
        known = ", ".join(fields) or "none"
        raise ValueError(f"{owner}: unknown parameter {key!r}; parameters: {known}")
    kinds, optional = allowed_types(typing.get_type_hints(cls)[key])
    text = raw.strip()
    if optional and text.lower() in ("none", "null"):
        return None
    for kind in kinds:
        try:
            if kind is bool:
                if text.lower() in ("true", "false"):
                    return text.lower() == "true"
                continue
            if kind in (int, float):
                return kind(text)
            if kind is str:
                return text
        except ValueError:
            continue
    raise ValueError(f"{owner}: parameter {key} must be {type_name(typing.get_type_hints(cls)[key])}, got {text!r}")


def describe_params(cls: type) -> list[dict]:
    """[{name, type, default, doc, range}] of a dataclass declared with :func:`param`."""
    hints = typing.get_type_hints(cls)
    return [{"name": f.name, "type": type_name(hints[f.name]), "default": f.default, "doc": f.metadata["doc"],
             "range": range_text(f.metadata)} for f in dataclasses.fields(cls)]


def check_declared(cls: type, owner: str) -> None:
    """Every field declared with :func:`param` and of a type the CLI and configs can carry."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "doc" not in f.metadata:
            raise TypeError(f"{owner}: declare parameter {f.name} with param(default, doc, ...)")
        kinds, _ = allowed_types(hints[f.name])
        if not set(kinds) <= {int, float, str, bool}:
            raise TypeError(f"{owner}: parameter {f.name} must be int, float, str or bool (optionally | None)")
