"""Sampling with fewer steps than training: timestep respacing (IDDPM sec. 4).

A subsequence S of the original timesteps defines a new diffusion with the
same marginals: alpha_bar'_i = alpha_bar_{S_i}, hence
beta'_i = 1 - alpha_bar_{S_i} / alpha_bar_{S_{i-1}}. The network was trained on
the original timesteps, so it is always called with S_i, never with i.
"""
from __future__ import annotations

from typing import Iterable, List, Sequence, Set, Union

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion


def _ddim_stride_timesteps(num_timesteps: int, desired_count: int) -> Set[int]:
    """0, k, 2k, ... with the one integer stride k that gives exactly ``desired_count`` steps.

    This is the uniform skipping of the DDIM paper; a count that no integer
    stride produces is an error rather than silently a different count.
    """
    for stride in range(1, num_timesteps):
        steps = range(0, num_timesteps, stride)
        if len(steps) == desired_count:
            return set(steps)
    raise ValueError(
        f"cannot create exactly {desired_count} steps out of {num_timesteps} "
        "with an integer stride"
    )


def space_timesteps(num_timesteps: int, section_counts: Union[str, Sequence[int]]) -> Set[int]:
    """Choose which original timesteps to keep.

    :param num_timesteps: T of the original process.
    :param section_counts: ``"ddimN"`` for DDIM's integer striding, or a
        comma-separated string / list of counts: the T steps are cut into that
        many equal sections and section j keeps ``counts[j]`` steps spread evenly
        (fractional stride, rounded), always including its first and last step.
        ``"250"`` thus keeps 250 steps from 0 to T-1.
    :return: the set of kept timesteps.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            return _ddim_stride_timesteps(num_timesteps, int(section_counts[len("ddim"):]))
        section_counts = [int(x) for x in section_counts.split(",")]

    size_per, extra = divmod(num_timesteps, len(section_counts))
    start_idx = 0
    all_steps: List[int] = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        # Accumulated (not multiplied) so the rounding of each index matches ADM exactly.
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion over a subsequence of a base diffusion's timesteps.

    :param use_timesteps: the original timesteps to keep.
    :param kwargs: the keyword arguments of the base :class:`GaussianDiffusion`
        (``betas`` being the full original schedule).

    ``timestep_map[i]`` is the original timestep of respaced index i; every
    model call receives ``timestep_map[t]`` (as ADM with ``rescale_timesteps=False``).
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs):
        self.use_timesteps = set(use_timesteps)
        self.original_num_steps = len(kwargs["betas"])
        base = GaussianDiffusion(**kwargs)

        self.timestep_map: List[int] = []
        self._map_tensors: dict = {}  # (device, dtype) → timestep_map as a tensor, see model_timesteps
        new_betas = []
        last_alpha_cumprod = 1.0
        for i, alpha_cumprod in enumerate(base.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        kwargs["betas"] = np.array(new_betas)
        super().__init__(**kwargs)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Original timesteps ``timestep_map[t]``, in ``t``'s dtype and device.

        The map is copied to a device once and kept: ``torch.tensor(list, device=cuda)`` at every
        model call would make the host wait for the GPU inside the sampling loop.
        """
        key = (str(t.device), t.dtype)
        if key not in self._map_tensors:
            self._map_tensors[key] = torch.tensor(self.timestep_map, device=t.device, dtype=t.dtype)
        return self._map_tensors[key][t]
