"""The caching engine: the one object that knows about caches.

A model with ``model.cache_context = engine`` routes every block through :meth:`CacheEngine.block`
and every attention/MLP branch through :meth:`CacheEngine.branch`. The engine asks the attached
method what to do (compute, reuse, recompute a token subset, blend, or skip a span of blocks),
keeps the pre-gate branch outputs and span residuals, and counts the tokens each branch really
computed. The sampling loop tells it the step through :attr:`CacheEngine.step_listener`.

Use::

    with attach(model, get_method("fora", interval=3), "ddim50") as engine:
        x = generate(model, engine.sampler, labels, gens, cfg_scale=1.5,
                     step_listener=engine.step_listener)
    engine.summary()   # counts and decisions of the last generation

Overhead counters (per batch row, per step) recorded by the engine itself:

* ``explicit_attention`` — attention branches run with explicit softmax probabilities handed
  to the method (same matmul MACs as fused attention; the method's reduction of the map is
  counted by the method, e.g. ToCa's ``attention_scores``);
* ``span_residual_tokens`` — tokens of a stored or re-added span residual (one add of D values
  per token).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Union

import torch

from tokencache.cache.actions import Blend, Compute, ComputeSpan, Reuse, ReuseSpan, Subset
from tokencache.cache.methods import CacheMethod, ModelInfo, get_method
from tokencache.cache.records import BRANCHES, Record
from tokencache.sampling import Sampler, parse_sampler

_BRANCH_INDEX = {name: i for i, name in enumerate(BRANCHES)}


def model_info(model: torch.nn.Module, sampler: Sampler) -> ModelInfo:
    """The :class:`ModelInfo` of a DiT / MDT / MDTv2 model for a sampling run."""
    return ModelInfo(
        family=type(model).__name__,
        block_count=int(model.block_count),
        num_tokens=int(model.num_tokens),
        grid_size=int(model.x_embedder.grid_size),
        half_depth=getattr(model, "half_depth", None),
        sampler_name=sampler.name,
        sampler_loop=sampler.loop,
        num_steps=sampler.steps,
        model=model,
    )


class CacheEngine:
    """The :class:`~tokencache.models.layers.CacheContext` that carries out a method's decisions.

    ``sampler`` is the sampler the run must use (the method may have changed it, e.g. ``steps``);
    ``num_steps`` its step count. State (stored outputs, residuals, counts, the method's own
    state) is reset at step 0 of every generation and by :meth:`reset`, so consecutive
    generations, also with different batch sizes, are independent.
    """

    def __init__(self, model: torch.nn.Module, method: CacheMethod, sampler: Union[Sampler, str]):
        requested = parse_sampler(sampler) if isinstance(sampler, str) else sampler
        self.model = model
        self.method = method
        self.requested_sampler = requested
        self.sampler = parse_sampler(method.sampler_override(requested.name))
        self.num_steps = self.sampler.steps
        self.info = model_info(model, self.sampler)
        self.num_tokens = self.info.num_tokens
        self.block_count = self.info.block_count
        self.step = -1
        self.record = Record(self.num_steps, self.block_count, self.num_tokens)
        self._outputs: dict[tuple[int, int], torch.Tensor] = {}
        self._span_inputs: dict[tuple[int, int], torch.Tensor] = {}
        self._residuals: dict[tuple[int, int], torch.Tensor] = {}
        self._observe = getattr(method, "observe", None)
        method._record = self._count_overhead
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
        """Forget every stored output, residual, count and the method's state."""
        self._outputs.clear()
        self._span_inputs.clear()
        self._residuals.clear()
        self.record = Record(self.num_steps, self.block_count, self.num_tokens)
        self.step = -1
        self.method.reset()

    def step_listener(self, step: int, num_steps: int) -> None:
        """The sampling loop's clock (``generate(..., step_listener=engine.step_listener)``)."""
        if num_steps != self.num_steps:
            raise ValueError(f"the engine was attached for {self.num_steps} steps ({self.sampler.name}) but the "
                             f"sampler runs {num_steps}: sample with engine.sampler")
        self.begin_step(step)

    def begin_step(self, step: int) -> None:
        """Enter step ``step``; step 0 starts a new generation (everything is reset)."""
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step {step} outside 0…{self.num_steps - 1}")
        if step == 0:
            self.reset()
        self.step = step
        self.record.steps_run = max(self.record.steps_run, step + 1)
        if self.method.passthrough:
            self.record.counts[step] = self.num_tokens
            self.record.blocks_run[step] = 1
        self.method.begin_step(step)

    # ------------------------------------------------------------------ CacheContext

    def block(self, index: int, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        self._check_step()
        action = self.method.block_action(self.step, index)
        if action is None:
            self.record.blocks_run[self.step, index] = 1
            return fn(x)
        key = (action.start, action.end)
        if isinstance(action, ReuseSpan):
            if index != action.start:
                return x
            residual = self._stored(self._residuals, key, x, f"residual of blocks {key[0]}…{key[1]}")
            self._count_overhead("span_residual_tokens", self.num_tokens)
            return x + residual
        if isinstance(action, ComputeSpan):
            self.record.blocks_run[self.step, index] = 1
            if index == action.start:
                self._span_inputs[key] = x
            out = fn(x)
            if index == action.end:
                self._residuals[key] = out - self._span_inputs.pop(key)
                self._count_overhead("span_residual_tokens", self.num_tokens)
            return out
        raise TypeError(f"{self.method.name}: block_action returned {action!r}; expected None, ComputeSpan or ReuseSpan")

    def branch(self, block: int, name: str, fn: Callable, x: torch.Tensor) -> torch.Tensor:
        self._check_step()
        action = self.method.branch_action(self.step, block, name)
        key = (block, _BRANCH_INDEX[name])
        if x.shape[0] != self.record.rows:
            self.record.rows = x.shape[0]
        if isinstance(action, Compute):
            attention = None
            if action.attention:
                out, attention = fn(x, return_attention=True)
                self._count_overhead("explicit_attention", 1)
            else:
                out = fn(x)
            if action.store:
                self._outputs[key] = out.clone() if self.clone_stored else out
            self.record.counts[self.step, block, key[1]] = self.num_tokens
            if self._observe is not None:
                self._observe(self.step, block, name, x=x, output=out, attention=attention)
            return out
        if isinstance(action, Reuse):
            self.record.counts[self.step, block, key[1]] = 0
            return self._stored(self._outputs, key, x, f"{name} output of block {block}")
        if isinstance(action, Subset):
            return self._subset(block, name, key, fn, x, action.tokens)
        if isinstance(action, Blend):
            stored = self._stored(self._outputs, key, x, f"{name} output of block {block}")
            self.record.counts[self.step, block, key[1]] = self.num_tokens
            return stored * (1 - action.weight) + fn(x) * action.weight
        raise TypeError(f"{self.method.name}: branch_action returned {action!r}; expected Compute, Reuse, Subset or Blend")

    # ------------------------------------------------------------------ internals

    def _subset(self, block: int, name: str, key, fn, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        stored = self._stored(self._outputs, key, x, f"{name} output of block {block}")
        if tokens.dim() != 2 or tokens.shape[0] not in (1, x.shape[0]) or tokens.dtype != torch.int64:
            raise ValueError(f"{self.method.name}: Subset tokens must be int64 (batch {x.shape[0]} or 1, k), "
                             f"got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.shape[0] != x.shape[0]:
            tokens = tokens.expand(x.shape[0], -1)
        fresh = fn(x, tokens=tokens)
        index = tokens.unsqueeze(-1).expand(-1, -1, stored.shape[-1])
        if torch.is_grad_enabled() and (fresh.requires_grad or stored.requires_grad):
            out = stored.scatter(1, index, fresh)
        else:
            out = stored.scatter_(1, index, fresh)
        self._outputs[key] = out
        self.record.counts[self.step, block, key[1]] = tokens.shape[1]
        if self._observe is not None:
            self._observe(self.step, block, name, x=x, output=out, attention=None)
        return out

    def _stored(self, store: dict, key, x: torch.Tensor, what: str) -> torch.Tensor:
        value = store.get(key)
        if value is None:
            raise RuntimeError(f"{self.method.name} asked to reuse the {what} at step {self.step}, but nothing is "
                               "stored (a method bug: the first use must compute)")
        if value.shape != x.shape:
            raise RuntimeError(f"{self.method.name}: stored {what} has shape {tuple(value.shape)}, the current "
                               f"input {tuple(x.shape)} (batch changed without a reset at step 0)")
        return value

    def _check_step(self) -> None:
        if self.step < 0:
            raise RuntimeError("the cache engine was not told the step: pass step_listener=engine.step_listener "
                               "to generate (or call engine.begin_step)")

    def _count_overhead(self, name: str, amount: int) -> None:
        self.record.add_overhead(max(self.step, 0), name, amount)

    # ------------------------------------------------------------------ results

    @property
    def counts(self):
        """Tokens computed per batch row, int64 array (steps, blocks, 2): [..., 0] attn, [..., 1] mlp."""
        return self.record.counts.copy()

    @property
    def blocks_run(self):
        """1 where a block ran at a step, 0 where it was skipped inside a reused span: (steps, blocks)."""
        return self.record.blocks_run.copy()

    def summary(self, counts: bool = True) -> dict:
        """JSON-serialisable summary of the last generation, with the method and sampler.

        Keys: method, params, sampler (run), requested_sampler, token_fraction_of_requested
        (tokens computed ÷ a full run of the requested sampler: what ``steps`` saves), family,
        num_steps, steps_run, block_count, num_tokens,
        rows (batch rows the model saw; 0 for passthrough methods, which bypass the engine),
        skipped_fraction (block-branches reused), partial_fraction (recomputed for a token
        subset), token_fraction / attn_token_fraction / mlp_token_fraction (tokens computed ÷
        full), full_steps, blocks_run_fraction, per_step {full, cached, partial,
        token_fraction}, overhead {name: {total, per_step}}, and with ``counts`` the arrays
        ``counts`` (steps × blocks × [attn, mlp]) and ``blocks_run`` (steps × blocks).
        """
        record = self.record.summary(counts)
        full_cost = self.requested_sampler.steps * self.block_count * 2 * self.num_tokens
        return {"method": self.method.name, "params": self.method.params(), "sampler": self.sampler.name,
                "requested_sampler": self.requested_sampler.name,
                "token_fraction_of_requested": round(float(self.record.counts.sum()) / full_cost, 6),
                "family": self.info.family, **record}


@contextmanager
def attach(model: torch.nn.Module, method: Union[CacheMethod, str], sampler: Union[Sampler, str],
           **params) -> Iterator[CacheEngine]:
    """Attach ``method`` (an instance, or a name plus ``params``) to ``model`` for ``sampler``.

    Yields the :class:`CacheEngine`; sample with ``engine.sampler`` and
    ``step_listener=engine.step_listener``. The cache context is removed on exit, also on errors.
    """
    if isinstance(method, str):
        method = get_method(method, **params)
    elif params:
        raise ValueError("pass parameters either to get_method or to attach with a method name, not both")
    engine = CacheEngine(model, method, sampler).attach()
    try:
        yield engine
    finally:
        engine.detach()
