"""The digits testbed: scikit-learn's 1,797 real 8x8 handwritten digits, class-conditional.

The images ship inside scikit-learn (``sklearn.datasets.load_digits``), so the testbed needs no
download. Pixel intensities are integers 0..16; the diffusion models see them scaled to [-1, 1]
(``x / 8 - 1``), one channel, 8x8 (64 tokens at patch size 1).

The split is fixed by a seed and stratified by class: ``train`` trains the backbones and the
digits evaluator's classifier, ``test`` is held out (the evaluator's accuracy on it is reported,
and it serves as the FID reference batch of real digits).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DIGITS_SIZE = 8
DIGITS_CLASSES = 10
DIGITS_MAX = 16.0


@dataclass(frozen=True)
class DigitsSplit:
    """Images in [-1, 1] as float32 (N, 1, 8, 8) and labels int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def load_digits_dataset(split: str = "train", test_fraction: float = 0.25, seed: int = 0) -> DigitsSplit:
    """Return one split ("train", "test" or "all") of the scikit-learn digits.

    The split is stratified by class and depends only on ``seed`` and ``test_fraction``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test", "all"):
        raise ValueError(f"unknown digits split {split!r}: use 'train', 'test' or 'all'")
    bunch = load_digits()
    images = bunch.images.astype(np.float32)  # (1797, 8, 8) in 0..16
    labels = bunch.target.astype(np.int64)
    if split != "all":
        index = np.arange(len(labels))
        train_idx, test_idx = train_test_split(
            index, test_size=test_fraction, random_state=seed, stratify=labels
        )
        keep = np.sort(train_idx if split == "train" else test_idx)
        images, labels = images[keep], labels[keep]
    scaled = images / (DIGITS_MAX / 2.0) - 1.0
    return DigitsSplit(torch.from_numpy(scaled).unsqueeze(1).contiguous(), torch.from_numpy(labels))


def digits_to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Real digits in [-1, 1] (N, 1, H, W) → ADM layout uint8 (N, H, W, 3), gray repeated.

    Uses DiT's conversion ``clamp(127.5 x + 128, 0, 255)`` so real and generated testbed
    images go through the same quantisation.
    """
    x = torch.as_tensor(images, dtype=torch.float32)
    u8 = (127.5 * x + 128.0).clamp(0, 255).to(torch.uint8)
    return u8.permute(0, 2, 3, 1).repeat(1, 1, 1, 3 // u8.shape[1]).numpy()
