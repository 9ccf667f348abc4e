"""Where sampling noise comes from: the global RNG, one generator, or one per row.

The benchmark compares caching methods sample by sample, so a sample must not
change when its batch neighbours change. With one generator per batch row the
noise of row i is drawn from ``generators[i]`` alone, in the same order
whatever the batch size; with ``None`` the global RNG is used exactly as the
official ADM/DiT code uses it, so seeded runs reproduce theirs.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

GeneratorArg = Union[None, torch.Generator, Sequence[torch.Generator]]


def randn_rows(
    shape: Sequence[int],
    generators: GeneratorArg,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Draw standard normal noise of ``shape``.

    :param generators: ``None`` draws from the global RNG (``torch.randn``, the
        same stream as ``torch.randn_like``); a ``torch.Generator`` draws the
        whole tensor from it; a sequence of ``shape[0]`` generators draws row i
        from ``generators[i]`` only.
    :param device: where the result lives. A generator draws on its own device
        and the result is moved, so CPU generators can seed GPU sampling.
    :param dtype: ``None`` means the default float dtype, as ``torch.randn``.
    """
    shape = tuple(int(s) for s in shape)
    if generators is None:
        return torch.randn(shape, device=device, dtype=dtype)

    def draw(size, generator):
        return torch.randn(size, generator=generator, device=generator.device, dtype=dtype)

    if isinstance(generators, torch.Generator):
        return _to_device(draw(shape, generators), device)
    generators = list(generators)
    if len(generators) != shape[0]:
        raise ValueError(
            f"got {len(generators)} generators for a batch of {shape[0]} rows; "
            "pass exactly one generator per row"
        )
    rows = [draw(shape[1:], g) for g in generators]
    if len({r.device for r in rows}) > 1:  # generators on several devices: move row by row
        return torch.stack([_to_device(r, device) for r in rows])
    return _to_device(torch.stack(rows), device)


def _to_device(x: torch.Tensor, device) -> torch.Tensor:
    """Move ``x`` to ``device`` without making the host wait for the GPU.

    A plain ``.to("cuda")`` of a CPU tensor waits until every queued kernel has finished, which
    inside the sampling loop (noise drawn on CPU generators at every step) stalls the queue once
    per step. Staged through pinned memory the copy is asynchronous; the same values arrive.
    """
    if device is None or x.device == torch.device(device):
        return x
    if x.device.type == "cpu" and torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)
