"""The digits testbed's "Inception": a small CNN trained on the real digits' train split.

ImageNet's Inception-v3 means nothing on 8x8 grey digits, so the testbed measures FID, sFID, IS,
precision/recall and class consistency in the feature space of a classifier trained on the real
digits (the idea behind FID's pretrained classifier, scaled down). Its three outputs mirror the
ADM evaluator's three Inception taps, so the metric code is shared:

- ``pool``    (128-d): the penultimate layer, like pool_3 — FID, precision/recall;
- ``spatial`` (64-d): first 4 channels of the first conv stage's 4x4 map, flattened in (H, W, C)
  order, like sFID's first 7 channels of ``mixed_6/conv`` over 17x17 — local structure;
- ``logits``  (10-way): the digit classifier — IS and class consistency.

Dimensions stay below the 450 images of the held-out split so its covariances are usable.
Training is seeded and single-threaded (the weights do not depend on the thread count) and takes
a few seconds on CPU; dropout, weight decay and label smoothing 0.1 regularise it (held-out
accuracy ~99%). Label smoothing caps the confidence, so the testbed's IS tops out near 6, not 10.
The extractor is registered in torch-fidelity as ``"tokencache-digits"``.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from tokencache.data.digits import DIGITS_CLASSES, DIGITS_SIZE, load_digits_dataset
from tokencache.io import write_atomic

CHECKPOINT_FORMAT = "tokencache-digits-evaluator/1"
TORCH_FIDELITY_NAME = "tokencache-digits"
SPATIAL_CHANNELS = 4


class DigitsNet(nn.Module):
    """conv(1→32) → maxpool → conv(32→64) → fc(1024→128) → linear(128→10), ReLUs between."""

    def __init__(self, dropout: float = 0.3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, 128)
        self.head = nn.Linear(128, DIGITS_CLASSES)
        self.dropout = dropout

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images in [-1, 1], (N, 1, 8, 8) → (pool (N, 128), spatial (N, 64), logits (N, 10))."""
        mid = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (N, 32, 4, 4)
        pool = F.relu(self.fc(F.relu(self.conv2(mid)).flatten(1)))
        spatial = mid[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(x), -1)
        logits = self.head(F.dropout(pool, self.dropout, self.training))
        return pool, spatial, logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[2]


@torch.no_grad()
def _accuracy(net: DigitsNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((net(images).argmax(dim=1) == labels).double().mean())


def _fit(net: DigitsNet, seed: int, epochs: int, batch_size: int, lr: float, weight_decay: float, label_smoothing: float) -> None:
    train = load_digits_dataset("train")
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(train) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), batch_size):
            idx = order[start : start + batch_size]
            logits = net(train.images[idx])
            loss = F.cross_entropy(logits, train.labels[idx], label_smoothing=label_smoothing)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
    net.eval().requires_grad_(False)


def train_digits_evaluator(
    out_path: str | os.PathLike | None = None,
    seed: int = 0,
    epochs: int = 15,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    label_smoothing: float = 0.1,
) -> DigitsNet:
    """Train the evaluator on ``load_digits_dataset("train")``; save to ``out_path`` if given.

    Initialisation, shuffling and dropout draw only from ``seed`` (the caller's RNG state is
    restored afterwards) and training runs on one thread, so the same seed gives identical
    weights. The returned network carries ``net.meta``: hyper-parameters, train and held-out
    test accuracy.
    """
    hyper = dict(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, label_smoothing=label_smoothing)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = DigitsNet()
            _fit(net, seed, **hyper)
    finally:
        torch.set_num_threads(threads)
    train, test = load_digits_dataset("train"), load_digits_dataset("test")
    net.meta = {
        "format": CHECKPOINT_FORMAT,
        "seed": seed,
        **hyper,
        "train_size": len(train),
        "test_size": len(test),
        "train_accuracy": _accuracy(net, train.images, train.labels),
        "test_accuracy": _accuracy(net, test.images, test.labels),
        "torch_version": str(torch.__version__),
    }
    if out_path is not None:
        save_digits_evaluator(net, out_path)
    return net


def save_digits_evaluator(net: DigitsNet, path: str | os.PathLike) -> None:
    """Write weights and metadata to a small .pt file (atomically: temp file, then rename)."""
    write_atomic(path, {"format": CHECKPOINT_FORMAT, "meta": net.meta, "state_dict": net.state_dict()}, format="torch")


def load_digits_evaluator(path: str | os.PathLike) -> DigitsNet:
    """Load a checkpoint written by ``train_digits_evaluator``; ``net.meta`` holds its metadata."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"digits evaluator {path} does not exist: make it with `tokencache train-evaluator`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for files that are not checkpoints
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise ValueError(f"{path} is not a readable digits evaluator checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a digits evaluator checkpoint: write one with train_digits_evaluator()")
    net = DigitsNet()
    net.load_state_dict(ckpt["state_dict"])
    net.eval().requires_grad_(False)
    net.meta = dict(ckpt["meta"])
    return net


def class_consistency(probs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples the evaluator classifies as the label they were conditioned on."""
    probs, labels = np.asarray(probs), np.asarray(labels).reshape(-1)
    if len(probs) != len(labels):
        raise ValueError(f"class_consistency: {len(probs)} predictions but {len(labels)} labels")
    return float(np.mean(probs.argmax(axis=1) == labels))


def uint8_to_digits(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, 8, 8) → [-1, 1] (N, 1, 8, 8): channel mean, inverse of ``digits_to_uint8``."""
    return (images.float().mean(dim=1, keepdim=True) - 128.0) / 127.5


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity wrapper: uint8 (N, 3, 8, 8) in, features ``pool``/``spatial``/``logits`` out.

    ``feature_extractor_weights_path`` is a checkpoint from ``train_digits_evaluator``; ``net``
    passes an already loaded network instead.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, net=None, **kwargs):
        super().__init__(name, features_list)
        if net is None:
            if feature_extractor_weights_path is None:
                raise ValueError("the digits extractor needs feature_extractor_weights_path (see train_digits_evaluator)")
            net = load_digits_evaluator(feature_extractor_weights_path)
        self.net = net.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4 or tuple(x.shape[2:]) != (DIGITS_SIZE, DIGITS_SIZE):
            raise ValueError(f"digits extractor expects uint8 (N, C, 8, 8) images, got {x.dtype} {tuple(x.shape)}")
        pool, spatial, logits = self.net.features(uint8_to_digits(x))
        named = {"pool": pool, "spatial": spatial, "logits": logits}
        return tuple(named[k] for k in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "pool", "spatial", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "pool", "kid": "pool", "prc": "pool"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, DIGITS_SIZE, DIGITS_SIZE, dtype=torch.uint8)


if TORCH_FIDELITY_NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(TORCH_FIDELITY_NAME, DigitsFeatureExtractor)
