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
        out = torch.randn(size, generator=generator, device=generator.device, dtype=dtype)
        return out if device is None else out.to(device)

    if isinstance(generators, torch.Generator):
        return draw(shape, generators)
    generators = list(generators)
    if len(generators) != shape[0]:
        raise ValueError(
            f"got {len(generators)} generators for a batch of {shape[0]} rows; "
            "pass exactly one generator per row"
        )
    return torch.stack([draw(shape[1:], g) for g in generators])
