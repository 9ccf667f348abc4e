"""``torch.compile`` for sampling with or without a caching engine: the block branches, compiled.

What is compiled, and why not the whole forward: with a method attached, every block asks the
caching engine what to do, and the engine keeps Python state (the step, stored outputs, numpy
token counts, the method's own state). Compiled into one graph, the step number becomes a guard
(a recompile at every step, then a silent fall-back to eager once the recompile limit is hit)
and the engine's side effects would be traced. So the unit compiled is what the engine treats
as opaque: each block's attention branch ``Attn(modulate(LN(h)))`` and MLP branch
``MLP(modulate(LN(h)))`` (:meth:`TransformerBlock.attn_branch` / ``mlp_branch``), the same for
every method, the uncached reference included, so that methods are compared at one compile granularity. The
engine, the adaLN modulation, the gated residual adds and the embedders stay eager.

One compiled function serves all blocks (the block is an argument), and shapes become dynamic
after the first change (batch size, a token subset of another size), so a run compiles a few
graphs, not one per block or per subset size. Hitting the recompile limit is made an error
instead of a silent fall-back to eager code.

Modes ``reduce-overhead`` and ``max-autotune`` replay the branches as CUDA graphs, whose output
memory is reused by the next replay: an engine attached under these modes must store copies
(``CacheEngine.clone_stored``, set by :func:`tokencache.metrics.latency.measure_latency`).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Optional

import torch

from tokencache.models.layers import TransformerBlock

#: ``--compile`` choices; "none" runs eagerly.
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
#: modes whose compiled branches run as CUDA graphs (on CUDA devices).
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
#: recompiles allowed per compiled function before it is an error (dynamo's default is 8).
RECOMPILE_LIMIT = 64


def uses_cuda_graphs(mode: str, device: torch.device) -> bool:
    """Whether compiled branches replay as CUDA graphs (output memory reused between calls)."""
    return mode in CUDA_GRAPH_MODES and torch.device(device).type == "cuda"


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far (to check nothing compiles while timing)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@contextlib.contextmanager
def compiled_branches(model: torch.nn.Module, mode: str = "default", backend: str = "inductor",
                      dynamic: Optional[bool] = None) -> Iterator[torch.nn.Module]:
    """Within the context, every :class:`TransformerBlock` of ``model`` runs compiled branches.

    ``mode`` is a torch.compile mode ("none": nothing is compiled). ``backend`` other than
    "inductor" ("eager", "aot_eager") captures graphs without generating code — for tests of
    the wiring on slow machines; ``mode`` applies to inductor only. Compilation happens at the
    first call of each shape, so run a warm-up first; graphs compiled earlier in the process
    (same backend and mode, same shapes) are reused (``torch._dynamo.reset()`` forgets them).
    The model is restored on exit.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    blocks = [m for m in model.modules() if isinstance(m, TransformerBlock)]
    if mode == "none" or not blocks:
        yield model
        return
    options = {"mode": mode} if backend == "inductor" else {}
    attn = torch.compile(TransformerBlock.attn_branch, backend=backend, dynamic=dynamic, **options)
    mlp = torch.compile(TransformerBlock.mlp_branch, backend=backend, dynamic=dynamic, **options)
    for block in blocks:  # instance attributes shadow the methods that forward() calls
        block.attn_branch = functools.partial(attn, block)
        block.mlp_branch = functools.partial(mlp, block)
    try:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
            yield model
    finally:
        for block in blocks:
            del block.attn_branch, block.mlp_branch
