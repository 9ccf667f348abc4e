"""Shared fixtures: tiny models and checkpoints made on the spot (no downloads)."""
import os

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


def calibration_file(path, method: str, model, sampler: str, **tensors) -> str:
    """A calibration file of ``method`` (e.g. a router's or predictor's ``logits``) for ``model`` and ``sampler``."""
    from tokencache.cache import get_method
    from tokencache.cache.calibration import save_calibration
    from tokencache.sampling import parse_sampler

    save_calibration(path, get_method(method), model, parse_sampler(sampler), tensors)
    return str(path)


def readme_examples():
    """The python examples of baselines/README.md as plugin files in one fixed folder (returned).

    A fixed folder, so that every test loading them registers each example from the same file.
    """
    import re
    import tempfile
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "baselines" / "README.md").read_text()
    folder = Path(tempfile.gettempdir()) / f"tokencache-readme-examples-{os.getuid()}"
    folder.mkdir(exist_ok=True)
    blocks = re.findall(r"```python\n(\"\"\".*?)```", readme, re.S)
    for i, code in enumerate(blocks):
        path = folder / f"example_{i}.py"
        if not path.is_file() or path.read_text() != code:
            path.write_text(code)
    return folder, blocks


def workflow_script(name: str):
    """A module of workflow/scripts/ (they run under Snakemake, and import as plain modules too)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow" / "scripts"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)
