"""The force-fresh interval of the ToCa family, shared by ToCa and DuCa (a helper module, not a method).

Both official code bases set the full-step interval the same way when a block runs in full —
ToCa @ e84096ff ``DiT-ToCa/cache_functions/force_scheduler.py`` 12–19 (called from
``force_init.py`` 9–12), DuCa @ 0a7151b7 ``DuCa-DiT/cache_functions/force_scheduler.py`` 6–19
(``force_init.py`` 9): I = round(N / (1 + w − 2w·s/T)) in float32 (``torch.round``: half to
even), with w = 0 when R = 0 (the code's FORA mode), and I forced to the sensitive interval for
s in range(⌊0.2T⌋, ⌊0.4T⌋) when R ≠ 0. s is the count-down step index (``Step.countdown``).
"""
from __future__ import annotations

import torch


def refresh_interval(s: int, num_steps: int, interval: int, ratio: float, weight: float, sensitive: int) -> int:
    """I set by a full block at count-down step s: round(N / (1 + w − 2w·s/T)) in float32, or the forced one."""
    weight = 0.0 if ratio == 0 else weight
    factor = torch.tensor(1 + weight - 2 * weight * s / num_steps)
    threshold = int(torch.round(interval / factor))
    if ratio != 0 and int(num_steps * 0.2) <= s < int(num_steps * 0.4):
        threshold = sensitive
    return max(threshold, 1)
