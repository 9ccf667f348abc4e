"""The sampling step a method's hooks receive: one object for every way the code bases count steps.

The sampling loop counts k = 0, 1, …, T−1 from the first, noisiest step. The official code of
most methods counts *down*: ``current['step']`` (ToCa, DuCa, TaylorSeer), FORA's ``i`` and
L2C's routed index are s = T−1−k, so that s = 0 is the last step. The model itself sees the
original 0–999 timestep of the respaced sampler. A :class:`Step` carries all of them, so that
no method rebuilds s = T−1−k by hand:

* ``step.k`` — the sampling index k (0 = first);
* ``step.countdown`` — the official count-down index s = T−1−k;
* ``step.timestep`` — the original timestep the model is called with (None in a plan made
  without a sampler);
* ``step.num_steps`` — T, the steps of the sampler actually run.

A :class:`Step` *is* the integer k (a subclass of ``int``), so a hook written for plain step
indices — ``step % interval``, ``plan[step]``, ``(step, block)`` as a key — keeps working.
"""
from __future__ import annotations

from typing import Optional, Sequence


class Step(int):
    """Sampling step k of T (the int value is k), with its count-down index and timestep."""

    def __new__(cls, k: int, num_steps: int, timestep: Optional[int] = None):
        if not 0 <= k < num_steps:
            raise ValueError(f"step {k} outside 0…{num_steps - 1}")
        step = super().__new__(cls, k)
        object.__setattr__(step, "num_steps", int(num_steps))
        object.__setattr__(step, "timestep", None if timestep is None else int(timestep))
        return step

    def __setattr__(self, name, value):
        raise AttributeError("a Step is immutable")

    def __getnewargs__(self):
        return int(self), self.num_steps, self.timestep

    @property
    def k(self) -> int:
        """The sampling index: 0 at the first, noisiest step, T−1 at the last."""
        return int(self)

    @property
    def countdown(self) -> int:
        """s = T−1−k: the step index of the official code bases, T−1 at the first step, 0 at the last."""
        return self.num_steps - 1 - int(self)

    def __repr__(self) -> str:
        return (f"Step(k={int(self)}, countdown={self.countdown}, timestep={self.timestep}, "
                f"num_steps={self.num_steps})")


def sampling_steps(num_steps: int, timesteps: Optional[Sequence[int]] = None) -> tuple[Step, ...]:
    """Steps k = 0 … T−1 in sampling order (``timesteps[k]`` the timestep of step k, if known)."""
    if timesteps is not None and len(timesteps) != num_steps:
        raise ValueError(f"{len(timesteps)} timesteps for {num_steps} steps")
    return tuple(Step(k, num_steps, None if timesteps is None else timesteps[k]) for k in range(num_steps))
