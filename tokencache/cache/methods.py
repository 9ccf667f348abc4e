"""Caching methods as small dataclasses, and the registry that finds them by name.

A method is a dataclass subclass of :class:`CacheMethod` with a ``name`` and its parameters
declared with :func:`param` (default, one-line doc with the paper's symbol, allowed range)::

    @register_method
    @dataclass
    class FORA(CacheMethod):
        \"\"\"FORA: full step every N steps, all branch outputs reused in between.\"\"\"
        name = "fora"
        interval: int = param(3, "N: a full step every N steps", min=1)

        def branch_action(self, step, block, branch):
            return COMPUTE if step % self.interval == 0 else REUSE

The engine calls, per generation: :meth:`CacheMethod.setup` once (model shape, sampler), then
per step :meth:`~CacheMethod.begin_step`, per block :meth:`~CacheMethod.block_action` and per
branch :meth:`~CacheMethod.branch_action` (see :mod:`tokencache.cache.actions`), and
:meth:`~CacheMethod.observe` after a computation if the method defines it. Everything a method
decides from the schedule is plain Python; anything from tensors stays on the device.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Union

from tokencache.cache.actions import COMPUTE

#: name → method class; filled by :func:`register_method` (plugins in ``baselines/``).
_REGISTRY: dict[str, type] = {}


def param(default: Any, doc: str, *, min: Optional[float] = None, max: Optional[float] = None,
          choices: Optional[tuple] = None):
    """A method parameter: its default, a one-line doc (paper symbol first), its allowed values.

    ``min``/``max`` bound numbers (inclusive); ``choices`` lists the allowed values of a string.
    """
    meta = {"doc": doc, "min": min, "max": max, "choices": tuple(choices) if choices else None}
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelInfo:
    """What a method may know about the model and the sampling run it is attached to.

    ``family``: "DiT", "MDT" (v1) or "MDTv2"; ``block_count``: blocks in execution order;
    ``num_tokens``/``grid_size``: tokens per image and the side of their square grid;
    ``half_depth``: MDTv2's encoder half (its long skips pair block j with 2·half_depth−1−j),
    None otherwise; ``sampler_*``: the sampler actually run (``num_steps`` = its step count);
    ``model``: the model itself, for methods that must check a learned artefact against it.
    """

    family: str
    block_count: int
    num_tokens: int
    grid_size: int
    half_depth: Optional[int]
    sampler_name: str
    sampler_loop: str
    num_steps: int
    model: Any = dataclasses.field(default=None, repr=False, compare=False)


class CacheMethod:
    """Base of every caching method. Subclasses are dataclasses registered by name.

    Hooks (all optional except :meth:`branch_action`, whose default computes everything):

    * ``setup(info)`` — once per attach, with a :class:`ModelInfo`; precompute schedules here;
    * ``reset()`` — forget per-generation state (called at step 0 and by ``engine.reset()``);
    * ``begin_step(step)`` — before the model runs at step ``step`` (0 = first, noisiest);
    * ``block_action(step, block)`` → None or a span action;
    * ``branch_action(step, block, branch)`` → an action for branch "attn" or "mlp";
    * ``observe(step, block, branch, *, x, output, attention)`` — after a branch was computed
      (fully or partly); defined only by methods that learn from outputs or attention maps.
      ``output`` is the engine's stored tensor, updated in place by later subsets: clone what
      must be kept.
    * ``sampler_override(sampler_name)`` → the sampler to run instead (``steps`` method).

    ``passthrough = True`` marks methods that never change a branch (``full``, ``steps``): the
    engine then leaves the model untouched (no cache context) and counts every token.
    """

    name: ClassVar[str] = ""
    passthrough: ClassVar[bool] = False
    _record: Optional[Callable[[str, int], None]] = None

    def __post_init__(self) -> None:
        validate_params(self)

    # ------------------------------------------------------------------ hooks

    def setup(self, info: ModelInfo) -> None:
        self.info = info

    def reset(self) -> None:
        pass

    def begin_step(self, step: int) -> None:
        pass

    def block_action(self, step: int, block: int):
        return None

    def branch_action(self, step: int, block: int, branch: str):
        return COMPUTE

    def sampler_override(self, sampler_name: str) -> str:
        return sampler_name

    # observe(self, step, block, branch, *, x, output, attention) is looked up by the engine
    # only when a subclass defines it, so methods that need nothing pay nothing.

    # ------------------------------------------------------------------ helpers

    def count(self, name: str, amount: int) -> None:
        """Add ``amount`` (per batch row) to the overhead counter ``name`` of the current step."""
        if self._record is not None:
            self._record(name, amount)

    def params(self) -> dict:
        """The parameter values, JSON-serialisable."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


# ---------------------------------------------------------------------- parameters


def _allowed_types(annotation) -> tuple[tuple[type, ...], bool]:
    """(accepted Python types, None allowed) for a field annotation such as ``int | None``."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = typing.get_args(annotation)
        inner = tuple(a for a in args if a is not type(None))
        return inner, len(inner) < len(args)
    return (annotation,), False


def _type_name(annotation) -> str:
    kinds, optional = _allowed_types(annotation)
    name = " | ".join(getattr(k, "__name__", str(k)) for k in kinds)
    return f"{name} | None" if optional else name


def _range_text(meta: dict) -> str:
    if meta.get("choices"):
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    if meta.get("min") is None and meta.get("max") is None:
        return "any"
    lo = "−∞" if meta.get("min") is None else f"{meta['min']:g}"
    hi = "∞" if meta.get("max") is None else f"{meta['max']:g}"
    return f"{lo} … {hi}"


def validate_params(method: CacheMethod) -> None:
    """Check every field's type and range; a one-line ValueError names the first bad one."""
    hints = typing.get_type_hints(type(method))
    for f in dataclasses.fields(method):
        value = getattr(method, f.name)
        kinds, optional = _allowed_types(hints[f.name])
        meta = f.metadata
        prefix = f"{method.name}: parameter {f.name}"
        if value is None:
            if optional:
                continue
            raise ValueError(f"{prefix} is required ({_type_name(hints[f.name])}: {_range_text(meta)})")
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
            setattr(method, f.name, value)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok:
            raise ValueError(f"{prefix} must be {_type_name(hints[f.name])}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{prefix} must be finite, got {value!r}")
        lo, hi, choices = meta.get("min"), meta.get("max"), meta.get("choices")
        if choices and value not in choices:
            raise ValueError(f"{prefix} must be {_range_text(meta)}, got {value!r}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ValueError(f"{prefix} must be in {_range_text(meta)}, got {value!r}")


# ---------------------------------------------------------------------- registry


def register_method(cls: type) -> type:
    """Class decorator: make a :class:`CacheMethod` dataclass available by its ``name``.

    Registering the same name again from the same source file replaces it (a plugin loaded
    twice); from another file it is an error, so two plugins cannot silently shadow each other.
    """
    if not (isinstance(cls, type) and issubclass(cls, CacheMethod) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"register_method expects a @dataclass subclass of CacheMethod, got {cls!r}")
    name = cls.name
    if not name or not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"{cls.__name__}: set a method name (letters, digits, '-', '_'), got {name!r}")
    old = _REGISTRY.get(name)
    if old is not None and _source(old) != _source(cls):
        raise ValueError(f"method {name!r} is registered twice: {_source(old)} and {_source(cls)}")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "doc" not in f.metadata:
            raise TypeError(f"{name}: declare parameter {f.name} with param(default, doc, ...)")
        kinds, _ = _allowed_types(hints[f.name])
        if not set(kinds) <= {int, float, str, bool}:
            raise TypeError(f"{name}: parameter {f.name} must be int, float, str or bool (optionally | None)")
    _REGISTRY[name] = cls
    return cls


def _source(cls: type) -> str:
    import inspect

    try:
        return str(Path(inspect.getfile(cls)).resolve())
    except (TypeError, OSError):
        return cls.__module__


def _ensure_plugins() -> None:
    from tokencache.cache.plugins import load_default_plugins

    load_default_plugins()


def available_methods() -> list[str]:
    """Names of all registered methods (the default plugin folder is loaded on first use)."""
    _ensure_plugins()
    return sorted(_REGISTRY)


def method_class(name: str) -> type:
    """The registered class of method ``name``; ValueError listing the choices otherwise."""
    _ensure_plugins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def get_method(name: str, **params) -> CacheMethod:
    """A new instance of method ``name`` with ``params``; one-line ValueError on any mistake."""
    cls = method_class(name)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(params) - set(known))
    if unknown:
        allowed = ", ".join(known) if known else "none"
        raise ValueError(f"{name}: unknown parameter {unknown[0]!r}; parameters: {allowed}")
    return cls(**params)


def describe_methods() -> list[dict]:
    """JSON-serialisable list of {name, doc, params: [{name, type, default, doc, range}]}."""
    _ensure_plugins()
    out = []
    for name in sorted(_REGISTRY):
        cls = _REGISTRY[name]
        hints = typing.get_type_hints(cls)
        doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        params = [{"name": f.name, "type": _type_name(hints[f.name]), "default": f.default,
                   "doc": f.metadata["doc"], "range": _range_text(f.metadata)}
                  for f in dataclasses.fields(cls)]
        out.append({"name": name, "doc": doc, "params": params, "source": _source(cls)})
    return out
