"""Make ``import torchvision`` work beside a CPU-only torch.

PyPI's torchvision wheels are built against CUDA torch. Beside the CPU build of
torch its compiled extension fails to load, and its Python code then registers a
fake kernel for ``torchvision::nms``, which raises
``RuntimeError: operator torchvision::nms does not exist``. That breaks timm,
torch-fidelity and clean-fid, which all import torchvision.

``ensure_torchvision_importable()`` probes the extension first and, only when it
cannot load, defines the schemas of the two operators torchvision registers fake
kernels for (``nms`` and ``qnms``), so the import goes through. Nothing here is
called by our code paths (we never run NMS); where torchvision loads normally it
is a no-op. The library handle is kept referenced for the life of the process,
because dropping it unregisters the schemas.
"""
from __future__ import annotations

import importlib.util
import os

_LIBRARY = None  # the torch.library.Library that holds the schemas; kept alive on purpose


def _extension_loads() -> bool:
    """True if torchvision's compiled ``_C`` extension can be loaded by this torch."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # not installed: nothing to patch, the ImportError is the user's to see
    import torch

    folder = list(spec.submodule_search_locations)[0]
    candidates = [f for f in os.listdir(folder) if f.startswith("_C") and f.endswith((".so", ".pyd"))]
    if not candidates:
        return False
    try:
        torch.ops.load_library(os.path.join(folder, candidates[0]))
    except (OSError, RuntimeError):
        return False
    return True


def ensure_torchvision_importable() -> None:
    """Define ``torchvision::nms``/``qnms`` schemas if torchvision's ops cannot load."""
    global _LIBRARY
    if _LIBRARY is not None or _extension_loads():
        return
    import torch

    try:
        torch.ops.torchvision.nms  # already defined by someone else
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY = lib
