"""Helpers shared by the metrics tests: random-weight Inception files, brute-force references."""
from __future__ import annotations

import contextlib
import os
import tempfile

import numpy as np
import torch
import torch.nn as nn

import tokencache  # noqa: F401  (makes torchvision, hence torch_fidelity, importable on CPU torch)
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3


class _UnloadedInception(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception-v3 with its layers built but no weights loaded."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return None


def write_random_inception_weights(path: str | os.PathLike, seed: int = 0) -> str:
    """Save a state dict in torch-fidelity's Inception-v3 layout with random (seeded) weights.

    Convolutions get He-normal weights and batch norms random statistics, so activations keep
    a usable scale through the 47 layers. Nothing is downloaded.
    """
    empty = os.fspath(path) + ".empty"
    torch.save({}, empty)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _UnloadedInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.uniform_(-0.1, 0.1)
    os.unlink(empty)
    torch.save(net.state_dict(), path)
    return os.fspath(path)


def brute_force_precision_recall(ref: np.ndarray, smp: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision/recall from full float64 distance matrices and a full sort."""
    def sq(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    ref, smp = np.asarray(ref, np.float64), np.asarray(smp, np.float64)
    ref_radii = np.sort(sq(ref, ref), axis=1)[:, k]
    smp_radii = np.sort(sq(smp, smp), axis=1)[:, k]
    cross = sq(smp, ref)  # (Ns, Nr)
    precision = np.mean((cross <= ref_radii[None, :]).any(axis=1))
    recall = np.mean((cross <= smp_radii[:, None]).any(axis=0))
    return float(precision), float(recall)


_DIGITS_DIR = tempfile.TemporaryDirectory(prefix="tokencache-digits-evaluator-")


def digits_evaluator_path(seed: int = 0) -> str:
    """A digits evaluator trained once per seed and test session (a few seconds), shared by modules."""
    from tokencache.metrics.digits_evaluator import train_digits_evaluator

    path = os.path.join(_DIGITS_DIR.name, f"digits_evaluator_seed{seed}.pt")
    if not os.path.exists(path):
        train_digits_evaluator(path, seed=seed)
    return path


@contextlib.contextmanager
def torch_threads(n: int):
    """Run torch ops on ``n`` threads, restoring the previous count. The tests' tensors are tiny;
    on small (2-vCPU) machines convolutions ran several times slower on 2 threads than on 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
