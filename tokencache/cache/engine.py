"""The caching engine: the one object that knows about caches.

A model with ``model.cache_context = engine`` routes every block through :meth:`CacheEngine.block`
(as a :class:`~tokencache.models.layers.BlockCall`) and every attention/MLP branch through
:meth:`CacheEngine.branch`. The engine asks the attached method what to do — compute, reuse,
recompute a token subset, blend, take the method's own forecast, or cache a span of blocks
through its residual, batch-wide or per batch row — keeps the pre-gate branch outputs and span
residuals, and counts the tokens each branch really computed for each row. The sampling loop
tells it the step through :attr:`CacheEngine.step_listener`.

Use::

    with attach(model, get_method(name, **params), "ddim50") as engine:
        x = generate(model, engine.sampler, labels, gens, cfg_scale=1.5,
                     step_listener=engine.step_listener)
    engine.summary()   # counts and decisions of the last generation

Per-row decisions. A per-row mask (``Reuse(rows=…)``, ``Span(reuse=…)``) is applied exactly
per row either way. Without host synchronisation every row is computed and the stored value
selected where the mask says reuse (no saving, and counted as computed); for a method that
declares ``host_sync = True`` the engine reads the mask once (``host_syncs`` in the summary)
and runs the blocks or branch only for the rows that need it, so each row costs what its own
decision says. A sample's result never depends on its batch neighbours.

Overhead counters (per batch row, per step) recorded by the engine itself, priced at 0 MACs:
``explicit_attention`` — attention branches run with explicit softmax probabilities handed to
the method (the same matmuls as fused attention); ``span_residual_tokens`` — tokens of a
stored or re-added span residual (an add of D values per token).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch

from tokencache.cache.actions import Blend, Compute, Forecast, Reuse, Span, Subset
from tokencache.cache.methods import CacheMethod, ModelInfo
from tokencache.cache.records import BRANCHES, Record
from tokencache.cache.registry import get_method
from tokencache.cache.steps import sampling_steps
from tokencache.models.shape import model_shape
from tokencache.sampling import Sampler, parse_sampler

_BRANCH_INDEX = {name: i for i, name in enumerate(BRANCHES)}
#: the engine's own overhead counters and their price (MAC-equivalents per unit)
ENGINE_PRICES = {"explicit_attention": 0, "span_residual_tokens": 0}


def model_info(model: torch.nn.Module, sampler: Sampler) -> ModelInfo:
    """The :class:`ModelInfo` of a DiT / MDT / MDTv2 model for a sampling run."""
    timestep_map = sampler.diffusion().timestep_map
    param = next(model.parameters(), None)
    return ModelInfo(
        family=type(model).__name__,
        block_count=int(model.block_count),
        num_tokens=int(model.num_tokens),
        grid_size=int(model.x_embedder.grid_size),
        skip_partners=dict(getattr(model, "skip_partners", {})),
        sampler_name=sampler.name,
        sampler_loop=sampler.loop,
        num_steps=sampler.steps,
        timesteps=tuple(int(timestep_map[sampler.steps - 1 - k]) for k in range(sampler.steps)),
        model=model,
        device=None if param is None else param.device,
    )


class BlockInput:
    """What a method may read at a block before deciding (``block_action``'s ``inputs``).

    ``x``: the block's input (B, N, D); ``c``: the conditioning vector (B, D) (timestep and
    label embedding); ``attention_input()``: the timestep-modulated input of the block's
    attention, modulate(LN(x), shift, scale), computed when asked (count its cost as overhead);
    ``rows_per_sample``: how many batch rows each sample has in this model call — 2 when the
    sampling loop runs classifier-free guidance as one doubled batch (sample i's conditional
    row is i, its null-label row i + B/2), else 1. A method that decides per sample from all of
    a sample's rows groups them with :meth:`sample_view`.
    """

    __slots__ = ("x", "_call", "rows_per_sample", "_engine", "_index")

    def __init__(self, x: torch.Tensor, call, rows_per_sample: int = 1, engine=None, index: int = 0):
        self.x, self._call, self.rows_per_sample = x, call, rows_per_sample
        self._engine, self._index = engine, index

    @property
    def c(self) -> torch.Tensor:
        return self._call.c

    def attention_input(self) -> torch.Tensor:
        return self._call.attention_input(self.x)

    def sample_view(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (B, …) as (samples, rows_per_sample · …): each sample's rows side by side, in row order."""
        return sample_view(t, self.rows_per_sample)

    def shadow(self, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run this block in full on ``x`` (every branch on every token) and return its output,
        which only the method sees: nothing is stored, no hook is asked, and the block then runs
        as the method decides. ``rows`` (int64 indices): only those batch rows (the output has
        their rows). Its tokens and block runs are recorded apart (``record.shadow_token_sums``,
        ``shadow_block_sums``), not in the counts of the model's output: the method prices the
        work as its overhead. A verification against a forecast is its use.
        """
        if self._engine is None:
            raise RuntimeError("shadow() needs the engine that asked for this block")
        return self._engine._shadow_block(self._index, self._call, self.x, rows)


def sample_view(t: torch.Tensor, rows_per_sample: int) -> torch.Tensor:
    """(B, …) → (B / r, r · …): row i and rows i + B/r, i + 2B/r, … (one sample's copies) as one row."""
    b = t.shape[0]
    if b % rows_per_sample:
        raise ValueError(f"a batch of {b} rows does not hold {rows_per_sample} rows per sample")
    return t.reshape(rows_per_sample, b // rows_per_sample, -1).transpose(0, 1).reshape(b // rows_per_sample, -1)


@dataclass
class _ActiveSpan:
    """A span being run: ``mode`` compute | reuse | split (rows by host decision) | select (per row, no sync)."""

    start: int
    end: int
    mode: str
    mask: Optional[torch.Tensor] = None  # select: rows that reuse (B,)
    reuse_rows: Optional[torch.Tensor] = None  # split: row indices
    compute_rows: Optional[torch.Tensor] = None
    span_input: Optional[torch.Tensor] = None  # what the stored value is relative to (zeros for keep="output")
    keep: str = "residual"

    @property
    def key(self) -> tuple:
        """Residuals belong to their span; a kept output to the block that produced it."""
        return (self.start, self.end) if self.keep == "residual" else ("output", self.end)


class CacheEngine:
    """The :class:`~tokencache.models.layers.CacheContext` that carries out a method's decisions.

    ``sampler`` is the sampler the run uses (after the method's
    :meth:`~tokencache.cache.methods.CacheMethod.transform_sampler`, which :func:`attach`
    applies); ``requested_sampler`` the one asked for (what a full run would have cost).
    Stored outputs, residuals, counts and the method's ``state`` are reset at step 0 of every
    generation and by :meth:`reset`, so consecutive generations, also with different batch
    sizes, are independent.
    """

    def __init__(self, model: torch.nn.Module, method: CacheMethod, sampler: Union[Sampler, str],
                 requested_sampler: Union[Sampler, str, None] = None):
        self.model = model
        self.method = method
        self.sampler = parse_sampler(sampler) if isinstance(sampler, str) else sampler
        requested = requested_sampler or self.sampler
        self.requested_sampler = parse_sampler(requested) if isinstance(requested, str) else requested
        self.num_steps = self.sampler.steps
        self.info = model_info(model, self.sampler)
        self.num_tokens = self.info.num_tokens
        self.block_count = self.info.block_count
        self.step = -1
        #: the Step objects the hooks receive (sampling index, count-down index, timestep, T)
        self.steps = sampling_steps(self.num_steps, self.info.timesteps)
        self.record = Record(self.num_steps, self.block_count, self.num_tokens)
        self._outputs: dict[tuple[int, int], torch.Tensor] = {}
        self._residuals: dict[tuple[int, int], torch.Tensor] = {}
        self._span: Optional[_ActiveSpan] = None
        self._rows: Optional[torch.Tensor] = None  # batch rows of the block running now (None: all)
        self._batch = 0
        #: rows per sample in the model call running now (2 inside a CFG forward, see BlockInput)
        self.rows_per_sample = 1
        self._observe = getattr(method, "observe", None)
        self._observe_block = getattr(method, "observe_block", None)
        self._shadow = False  # a shadow computation of a block is running (BlockInput.shadow)
        self._pending_seeds: Optional[tuple] = None  # the next generation's sample seeds (bind_samples)
        self._asks_blocks = type(method).block_action is not CacheMethod.block_action
        method._record = self._count_overhead
        method._host_read = self._count_host_read
        method.setup(self.info)
        self.attached = False
        #: Store copies of branch outputs instead of the outputs themselves. Needed when the
        #: branches run as CUDA graphs (torch.compile modes reduce-overhead / max-autotune): a
        #: graph's output memory is overwritten by its next replay, so an output kept for a later
        #: step must be copied out. The copy is part of the method's cost and is timed with it.
        self.clone_stored = False

    # ------------------------------------------------------------------ lifecycle

    def attach(self) -> "CacheEngine":
        """Set ``model.cache_context`` (passthrough methods leave the model untouched)."""
        if self.method.passthrough:
            return self
        if getattr(self.model, "cache_context", None) is not None:
            raise RuntimeError("the model already has a cache context attached; detach it first")
        self.model.cache_context = self
        self.attached = True
        return self

    def detach(self) -> None:
        if self.attached and self.model.cache_context is self:
            self.model.cache_context = None
        self.attached = False

    def reset(self) -> None:
        """Forget every stored output, residual and count; give the method a fresh ``state``."""
        self._outputs.clear()
        self._residuals.clear()
        self._span = None
        self._rows = None
        self.record = Record(self.num_steps, self.block_count, self.num_tokens)
        self.step = -1
        self.method.state = self.method.State() if self.method.State is not None else None

    def bind_samples(self, generators) -> None:
        """Tell the engine the generators of the next generation's samples (one per sample, in
        batch order); :func:`~tokencache.sampling.generate` does this for a listener that is an
        engine's :meth:`step_listener`. The method sees their initial seeds as ``sample_seeds``
        during that generation (None in a generation not told)."""
        self._pending_seeds = tuple(int(g.initial_seed()) for g in generators)

    def step_listener(self, step: int, num_steps: int) -> None:
        """The sampling loop's clock (``generate(..., step_listener=engine.step_listener)``)."""
        if num_steps != self.num_steps:
            raise ValueError(f"the engine was attached for {self.num_steps} steps ({self.sampler.name}) but the "
                             f"sampler runs {num_steps}: sample with engine.sampler")
        self.begin_step(step)

    def begin_step(self, step: int) -> None:
        """Enter step ``step`` (k, 0 = first); step 0 starts a new generation (everything is reset).

        From here on :attr:`step` is the :class:`~tokencache.cache.steps.Step` the hooks receive.
        """
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step {step} outside 0…{self.num_steps - 1}")
        if step == 0:
            self.reset()
            self.method.sample_seeds, self._pending_seeds = self._pending_seeds, None
        step = self.steps[step]
        self.step = step
        self.record.steps_run = max(self.record.steps_run, step + 1)
        if self.method.passthrough:  # counts per row with rows = 0: every token of every block
            self.record.token_sums[step] = self.num_tokens
            self.record.block_sums[step] = 1
            self.record.branch_row_sums[step] = 1
        self.method.begin_step(step)

    # ------------------------------------------------------------------ CacheContext: blocks

    def block(self, index: int, call, x: torch.Tensor) -> torch.Tensor:
        self._check_step()
        if self._rows is None:
            self._batch = self.record.rows = int(x.shape[0])
        span = self._span
        if span is None or not span.start < index <= span.end:
            action = (self.method.block_action(self.step, index, BlockInput(x, call, self.rows_per_sample, self, index))
                      if self._asks_blocks else None)
            if action is None:
                self.record.add_block(self.step, index, x.shape[0])
                out = call(x)
                if self._observe_block is not None:
                    self._observe_block(self.step, index, out)
                return out
            if not isinstance(action, Span) or action.start != index or action.end < action.start:
                raise TypeError(f"{self.method.name}: block_action at block {index} returned {action!r}; expected None "
                                f"or a Span starting at block {index}")
            span = self._span = self._begin_span(action, x)
        out = self._span_block(span, index, call, x)
        if index == span.end:
            self._span = None
        if self._observe_block is not None:
            self._observe_block(self.step, index, out)
        return out

    def _shadow_block(self, index: int, call, x: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
        """:meth:`BlockInput.shadow`: the block in full, every branch computed and nothing kept."""
        if self._shadow or self._rows is not None:
            raise RuntimeError(f"{self.method.name}: a shadow computation inside another or inside a row split")
        self._shadow = True
        try:
            if rows is None:
                self.record.shadow_block_sums[self.step, index] += int(x.shape[0])
                return call(x)
            self.record.shadow_block_sums[self.step, index] += int(rows.numel())
            self._rows = rows
            return call(x.index_select(0, rows), rows)
        finally:
            self._shadow = False
            self._rows = None

    def _begin_span(self, action: Span, x: torch.Tensor) -> _ActiveSpan:
        if action.keep not in ("residual", "output"):
            raise ValueError(f"{self.method.name}: Span keep must be 'residual' or 'output', got {action.keep!r}")
        base = dict(span_input=x if action.keep == "residual" else torch.zeros_like(x), keep=action.keep)
        reuse = action.reuse
        if isinstance(reuse, bool):
            return _ActiveSpan(action.start, action.end, "reuse" if reuse else "compute", **base)
        mask = reuse.to(torch.bool).reshape(-1)
        if mask.shape[0] != x.shape[0]:
            raise ValueError(f"{self.method.name}: Span reuse mask has {mask.shape[0]} rows, the batch {x.shape[0]}")
        if not self.method.host_sync:
            return _ActiveSpan(action.start, action.end, "select", mask=mask, **base)
        rows = self._host_rows(mask)
        if rows is None:
            return _ActiveSpan(action.start, action.end, "reuse" if bool(mask[0]) else "compute", **base)
        return _ActiveSpan(action.start, action.end, "split", reuse_rows=rows[0], compute_rows=rows[1], **base)

    def _span_block(self, span: _ActiveSpan, index: int, call, x: torch.Tensor) -> torch.Tensor:
        what = (f"residual of blocks {span.start}…{span.end}" if span.keep == "residual"
                else f"output of block {span.end}")
        first, last = index == span.start, index == span.end
        if span.mode == "reuse":
            if not first:
                return x
            self._count_overhead("span_residual_tokens", self.num_tokens)
            return span.span_input + self._stored(self._residuals, span.key, x, what)
        if span.mode in ("compute", "select"):
            self.record.add_block(self.step, index, x.shape[0])
            out = call(x)
            if not last:
                return out
            residual = out - span.span_input
            self._count_overhead("span_residual_tokens", self.num_tokens)
            if span.mode == "select" and span.key in self._residuals:
                # rows that reuse keep their stored residual and take x_in + it (before anything is
                # stored, the host cannot know that a row asked too early: every row is computed)
                old = self._stored(self._residuals, span.key, x, what)
                keep = span.mask.view(-1, 1, 1)
                residual = torch.where(keep, old, residual)
                out = torch.where(keep, span.span_input + old, out)
            self._residuals[span.key] = residual
            return out
        # split: the host read the mask; only the rows that compute run the blocks
        reuse, compute = span.reuse_rows, span.compute_rows
        self.record.add_block(self.step, index, compute.numel())
        out = torch.empty_like(x)
        if first:
            stored = self._stored(self._residuals, span.key, x, what)
            out.index_copy_(0, reuse, span.span_input.index_select(0, reuse) + stored.index_select(0, reuse))
            self._count_overhead("span_residual_tokens", self.num_tokens)
        else:
            out.index_copy_(0, reuse, x.index_select(0, reuse))
        self._rows = compute
        try:
            out.index_copy_(0, compute, call(x.index_select(0, compute), compute))
        finally:
            self._rows = None
        if last:
            fresh = out.index_select(0, compute) - span.span_input.index_select(0, compute)
            self._residuals[span.key] = self._residuals[span.key].index_copy(0, compute, fresh)
        return out

    # ------------------------------------------------------------------ CacheContext: branches

    def branch(self, block: int, name: str, fn, x: torch.Tensor) -> torch.Tensor:
        self._check_step()
        if self._shadow:  # BlockInput.shadow: computed for the method's eyes only
            self.record.shadow_token_sums[self.step, block, _BRANCH_INDEX[name]] += self.num_tokens * int(x.shape[0])
            return fn(x)
        if self._rows is None:
            self._batch = self.record.rows = int(x.shape[0])
        action = self.method.branch_action(self.step, block, name)
        key = (block, _BRANCH_INDEX[name])
        what = f"{name} output of block {block}"
        rows = int(x.shape[0])
        if isinstance(action, Compute):
            attention, extra = None, {}
            if action.attention or action.values:
                out, *asked = fn(x, return_attention=action.attention, return_values=action.values)
                if action.attention:
                    attention = asked.pop(0)
                    self._count_overhead("explicit_attention", 1)
                if action.values:
                    extra["values"] = asked.pop(0)
            else:
                out = fn(x)
            if action.store:
                self._put(key, out)
            self.record.add_tokens(self.step, block, key[1], self.num_tokens, rows)
            # under CUDA graphs the graph's output is overwritten by its next replay: hand the
            # method the stored copy, which it may keep across steps
            kept = self._outputs[key] if action.store and self.clone_stored and self._rows is None else out
            self._observed(block, name, x, kept, attention, **extra)
            return out
        if isinstance(action, Reuse):
            if action.rows is None:
                return self._get(key, x, what)
            return self._reuse_rows(block, name, key, fn, x, action.rows)
        if isinstance(action, Subset):
            return self._subset(block, name, key, fn, x, action.tokens, action.finish)
        if isinstance(action, Forecast):  # the whole batch's forecast; stored like a computed output
            out = action.output
            if out.shape[0] != self._batch or out.shape[1:] != x.shape[1:]:
                raise RuntimeError(f"{self.method.name}: forecast of the {what} has shape {tuple(out.shape)}, the "
                                   f"batch {self._batch} × {tuple(x.shape[1:])}")
            if action.rows is not None:
                return self._forecast_rows(block, name, key, fn, x, out, action.rows)
            self._put(key, out, all_rows=True)
            return out if self._rows is None else out.index_select(0, self._rows)
        if isinstance(action, Blend):
            stored = self._get(key, x, what)
            self.record.add_tokens(self.step, block, key[1], self.num_tokens, rows)
            return stored * (1 - action.weight) + fn(x) * action.weight
        raise TypeError(f"{self.method.name}: branch_action returned {action!r}; expected Compute, Reuse, Subset, "
                        "Forecast or Blend")

    def _reuse_rows(self, block: int, name: str, key, fn, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Reuse where ``mask`` (over the whole batch) is True, compute the other rows."""
        what = f"{name} output of block {block}"
        mask = mask.to(torch.bool).reshape(-1)
        if mask.shape[0] != self._batch:
            raise ValueError(f"{self.method.name}: Reuse rows mask has {mask.shape[0]} rows, the batch {self._batch}")
        if self._rows is not None:
            mask = mask.index_select(0, self._rows)
        stored = self._get(key, x, what)
        if not self.method.host_sync:  # every row computed, the stored value kept where the mask says reuse
            keep = mask.view(-1, 1, 1)
            out = torch.where(keep, stored, fn(x))
            self._put(key, out)
            self.record.add_tokens(self.step, block, key[1], self.num_tokens, x.shape[0])
            return out
        split = self._host_rows(mask)
        if split is None:
            if bool(mask[0]):
                return stored
            out = fn(x)
            self._put(key, out)
            self.record.add_tokens(self.step, block, key[1], self.num_tokens, x.shape[0])
            return out
        compute = split[1]
        out = stored.index_copy(0, compute, fn(x.index_select(0, compute), rows=compute))
        self._put(key, out)
        self.record.add_tokens(self.step, block, key[1], self.num_tokens, compute.numel())
        return out

    def _forecast_rows(self, block: int, name: str, key, fn, x: torch.Tensor, forecast: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
        """``Forecast(output, rows=mask)``: the forecast where ``mask`` (over the whole batch) is True, the
        branch computed in the other rows."""
        if self._rows is not None:
            raise RuntimeError(f"{self.method.name}: Forecast with rows inside a row split is not supported")
        mask = mask.to(torch.bool).reshape(-1)
        if mask.shape[0] != self._batch:
            raise ValueError(f"{self.method.name}: Forecast rows mask has {mask.shape[0]} rows, the batch {self._batch}")
        if not self.method.host_sync:  # every row computed, the forecast selected per row
            fresh = fn(x)
            out = torch.where(mask.view(-1, 1, 1), forecast, fresh)
            self._put(key, out)
            self.record.add_tokens(self.step, block, key[1], self.num_tokens, x.shape[0])
            self._observed(block, name, x, fresh, None)
            return out
        split = self._host_rows(mask)
        if split is None:
            if bool(mask[0]):
                self._put(key, forecast)
                return forecast
            compute = torch.arange(x.shape[0], device=x.device)
            fresh = fn(x)
            out = fresh
        else:
            compute = split[1]
            fresh = fn(x.index_select(0, compute), rows=compute)
            out = forecast.index_copy(0, compute, fresh)
        self._put(key, out)
        self.record.add_tokens(self.step, block, key[1], self.num_tokens, compute.numel())
        if self._observe is not None:
            self._observe(self.step, block, name, x=x.index_select(0, compute), output=fresh, attention=None,
                          rows=None if split is None else compute)
        return out

    def _subset(self, block: int, name: str, key, fn, x: torch.Tensor, tokens: torch.Tensor,
                finish=None) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape[0] not in (1, x.shape[0]) or tokens.dtype != torch.int64:
            raise ValueError(f"{self.method.name}: Subset tokens must be int64 (batch {x.shape[0]} or 1, k), "
                             f"got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.shape[0] != x.shape[0]:
            tokens = tokens.expand(x.shape[0], -1)
        if finish is not None:  # the method turns the recomputed tokens into the whole output
            if self._rows is not None:
                raise RuntimeError(f"{self.method.name}: Subset with finish inside a row split is not supported")
            fresh = fn(x, tokens=tokens)
            out = finish(fresh)
            if out.shape != x.shape[:2] + fresh.shape[2:]:
                raise RuntimeError(f"{self.method.name}: Subset finish returned {tuple(out.shape)} for the "
                                   f"{name} output of block {block}, expected {tuple(x.shape[:2] + fresh.shape[2:])}")
            self._put(key, out)
            self.record.add_tokens(self.step, block, key[1], tokens.shape[1], x.shape[0])
            return out
        stored = self._get(key, x, f"{name} output of block {block}")
        fresh = fn(x, tokens=tokens)
        index = tokens.unsqueeze(-1).expand(-1, -1, stored.shape[-1])
        in_place = self._rows is None and not (torch.is_grad_enabled() and (fresh.requires_grad or stored.requires_grad))
        out = stored.scatter_(1, index, fresh) if in_place else stored.scatter(1, index, fresh)
        if not in_place:
            self._put(key, out)
        self.record.add_tokens(self.step, block, key[1], tokens.shape[1], x.shape[0])
        self._observed(block, name, x, out, None)
        return out

    def span_residual(self, start: int, end: int) -> Optional[torch.Tensor]:
        """The stored residual x_out(end) − x_in(start) of the span ``start…end`` (None if none is stored).

        A :class:`~tokencache.cache.actions.Span` with ``keep="residual"`` stores it whenever its
        blocks run; a calibration reads it here (TeaCache's fit on the block stack's residual).
        """
        return self._residuals.get((start, end))

    # ------------------------------------------------------------------ internals

    def _host_rows(self, mask: torch.Tensor):
        """(reuse rows, compute rows) as index tensors on the mask's device, or None when all rows agree.

        The one host synchronisation of a per-row decision (counted in ``host_syncs``).
        """
        values = mask.to("cpu")
        self.record.host_syncs += 1
        reuse = values.nonzero().flatten()
        if reuse.numel() in (0, values.numel()):
            return None
        compute = (~values).nonzero().flatten()
        return reuse.to(mask.device, non_blocking=True), compute.to(mask.device, non_blocking=True)

    def _get(self, key, x: torch.Tensor, what: str) -> torch.Tensor:
        """The stored output for the rows running now."""
        value = self._stored(self._outputs, key, x, what)
        return value if self._rows is None else value.index_select(0, self._rows)

    def _put(self, key, value: torch.Tensor, all_rows: bool = False) -> None:
        """Store ``value`` — the rows running now, or (``all_rows``) the whole batch."""
        if self._rows is not None and not all_rows:
            base = self._outputs.get(key)
            if base is None or base.shape[0] != self._batch:
                base = value.new_zeros((self._batch,) + tuple(value.shape[1:]))
            self._outputs[key] = base.index_copy(0, self._rows, value)
            return
        self._outputs[key] = value.clone() if self.clone_stored else value

    def _stored(self, store: dict, key, x: torch.Tensor, what: str) -> torch.Tensor:
        value = store.get(key)
        if value is None:
            raise RuntimeError(f"{self.method.name} asked to reuse the {what} at step {self.step}, but nothing is "
                               "stored (a method bug: the first use must compute)")
        if value.shape[0] != self._batch or value.shape[1:] != x.shape[1:]:
            raise RuntimeError(f"{self.method.name}: stored {what} has shape {tuple(value.shape)}, the current "
                               f"batch {self._batch} × {tuple(x.shape[1:])} (batch changed without a reset at step 0)")
        return value

    def _observed(self, block: int, name: str, x, out, attention, **extra) -> None:
        if self._observe is not None:
            self._observe(self.step, block, name, x=x, output=out, attention=attention, rows=self._rows, **extra)

    def _check_step(self) -> None:
        if self.step < 0:
            raise RuntimeError("the cache engine was not told the step: pass step_listener=engine.step_listener "
                               "to generate (or call engine.begin_step)")

    def _count_host_read(self) -> None:
        self.record.host_syncs += 1

    def _count_overhead(self, name: str, amount: int) -> None:
        self.record.add_overhead(max(self.step, 0), name, amount)

    # ------------------------------------------------------------------ results

    @property
    def counts(self):
        """Tokens computed per batch row (mean over rows): (steps, blocks, 2), [..., 0] attn, [..., 1] mlp."""
        return self.record.counts

    @property
    def blocks_run(self):
        """Fraction of rows that ran each block at each step (0 where a reused span skipped it)."""
        return self.record.blocks_run

    def summary(self, counts: bool = True) -> dict:
        """JSON-serialisable summary of the last generation, with the method and sampler.

        Keys: method, role, params (as given), resolved (settings actually used), host_sync,
        sampler (run), requested_sampler, token_fraction_of_requested (tokens computed ÷ a full
        run of the requested sampler: what fewer steps save), family, num_steps, steps_run,
        block_count, num_tokens, rows (batch rows the model saw; 0 for passthrough methods,
        which bypass the engine), host_syncs, skipped_fraction (block-branches reused),
        partial_fraction (recomputed for a token subset), token_fraction / attn_token_fraction
        / mlp_token_fraction (tokens computed ÷ full), full_steps, blocks_run_fraction,
        per_step {computed, cached, partial, token_fraction}, overhead {name: {total, per_step}},
        overhead_prices {name: MAC-equivalents per unit}, calibration_param (the parameter
        holding a calibration file, or None), and with ``counts`` the per-row arrays ``counts``
        (steps × blocks × [attn, mlp]) and ``blocks_run`` (steps × blocks).
        """
        record = self.record.summary(counts)
        full_cost = self.requested_sampler.steps * self.block_count * 2 * self.num_tokens
        prices = {**ENGINE_PRICES, **self.method.overhead_macs(model_shape(self.model))}
        calibration = type(self.method).calibration
        return {"method": self.method.name, "role": self.method.role, "params": self.method.params(),
                "resolved": self.method.resolved(), "host_sync": self.method.host_sync,
                "sampler": self.sampler.name, "requested_sampler": self.requested_sampler.name,
                "token_fraction_of_requested": round(float(self.record.counts.sum()) / full_cost, 6),
                "family": self.info.family, **record, "overhead_prices": dict(sorted(prices.items())),
                "calibration_param": None if calibration is None else calibration.file_param}


@contextmanager
def attach(model: torch.nn.Module, method: Union[CacheMethod, str], sampler: Union[Sampler, str],
           **params) -> Iterator[CacheEngine]:
    """Attach ``method`` (an instance, or a name plus ``params``) to ``model`` for ``sampler``.

    The method's sampler transform is applied first (fewer steps run another sampler): sample
    with ``engine.sampler`` and ``step_listener=engine.step_listener``. The cache context is
    removed on exit, also on errors.
    """
    if isinstance(method, str):
        method = get_method(method, **params)
    elif params:
        raise ValueError("pass parameters either to get_method or to attach with a method name, not both")
    requested = parse_sampler(sampler) if isinstance(sampler, str) else sampler
    engine = CacheEngine(model, method, method.transform_sampler(requested), requested).attach()
    try:
        yield engine
    finally:
        engine.detach()
