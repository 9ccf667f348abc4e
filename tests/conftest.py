"""Shared fixtures: tiny models and checkpoints made on the spot (no downloads)."""
import pytest
import torch

import tokencache  # noqa: F401  (torchvision import fix before anything imports timm)
from tokencache.models import create_model

TINY = dict(input_size=8, patch_size=2, in_channels=1, num_classes=10, hidden_size=32, depth=4, num_heads=2)


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Give every parameter non-trivial values (the official init zeroes the adaLN and output layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture(autouse=True)
def one_thread():
    """Every test runs torch on one thread: the tensors are tiny, and one thread is ~40× faster than
    two threads on contended cores (and immune to a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_dit():
    return randomize(create_model("DiT", **TINY)).eval()


@pytest.fixture
def tiny_mdt():
    return randomize(create_model("MDTv2", **TINY, decode_layer=2, mask_ratio=0.3)).eval()
