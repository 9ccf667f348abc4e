"""Feature extractors for the quality metrics, behind one interface.

Every extractor maps uint8 images (ADM npz layout, NHWC) to three taps, so FID, sFID, IS,
precision/recall and class consistency run through one code path whatever the extractor:

- ``pool``:    features for FID and precision/recall;
- ``spatial``: features for sFID;
- ``logits``:  the classifier scores, and ``probs = softmax(logits)`` for IS.

``"inception"`` is torch-fidelity's port of the 2015 TF Inception-v3 graph that the ADM evaluator
runs (``FeatureExtractorInceptionV3``, TF-exact bilinear resize to 299): ``pool`` = pool_3
(2048), ``logits`` = ``logits_unbiased`` (1008; ADM's IS multiplies pool_3 by the softmax weights
without the bias), ``spatial`` = ADM's ``mixed_6/conv`` first 7 channels over 17x17 (2023).
torch-fidelity does not expose that tap, so it is taken with a forward hook on
``Mixed_6d.branch1x1``: torch-fidelity's weight converter maps TF ``mixed_6/conv`` to that
module. In the 2015 graph the scope ``mixed_6/conv`` holds ``Conv2D``, ``conv2d_params`` and
``batchnorm``, and the op named ``mixed_6/conv`` itself is the ReLU closing it, so ADM's tensor
``mixed_6/conv:0`` is the module's output after conv, batch norm and ReLU (192 x 17 x 17). The
first 7 channels are flattened in (H, W, C) order, as ADM's NHWC reshape does.

``"digits"`` is the digits testbed's small CNN (``tokencache.metrics.digits_evaluator``).
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from tokencache.errors import UserError

INCEPTION_WEIGHTS_ENV = "TOKENCACHE_INCEPTION_WEIGHTS"
DIGITS_WEIGHTS_ENV = "TOKENCACHE_DIGITS_EVALUATOR"
INCEPTION_SPATIAL_MODULE = "Mixed_6d.branch1x1"
INCEPTION_SPATIAL_CHANNELS = 7


class InceptionWeightsUnavailable(UserError, RuntimeError):
    """The Inception-v3 weights could not be downloaded and no local file was given."""


@dataclass
class FeatureExtractor:
    """A loaded extractor: ``module(uint8 NCHW, 3 channels) -> (pool, spatial, logits)``.

    ``identity`` records which weights produced the features (stored with every result);
    ``label_classifier`` says whether the logits index the samples' conditioning labels, which
    is what class consistency needs (true for digits; the 2015 Inception's 1008 outputs are not
    in the ImageNet-1k label order).
    """

    name: str
    module: nn.Module
    device: torch.device
    identity: dict = field(default_factory=dict)
    label_classifier: bool = False
    num_classes: int = 0  # classes of the label classifier (digits: 10)


class _InceptionADM(nn.Module):
    """torch-fidelity's Inception-v3 returning ADM's (pool_3, mixed_6/conv[..., :7], unbiased logits)."""

    def __init__(self, weights_path: str | None) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=weights_path
        )
        self._spatial: torch.Tensor | None = None
        self.net.get_submodule(INCEPTION_SPATIAL_MODULE).register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._spatial = output[:, :INCEPTION_SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(output), -1).float()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._spatial = None
        pool, logits = self.net(x)
        spatial, self._spatial = self._spatial, None
        return pool, spatial, logits


def _sha256(path: str) -> str:
    from tokencache.io import sha256_file

    return sha256_file(path)


def _state_sha256(net: nn.Module) -> str:
    """Digest of a network's parameters (names, shapes and bytes), for weights never saved to disk."""
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _load_inception(weights_path: str | None, device: torch.device) -> FeatureExtractor:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    weights_path = weights_path or os.environ.get(INCEPTION_WEIGHTS_ENV) or None
    try:
        module = _InceptionADM(weights_path)
    except (OSError, RuntimeError) as err:
        if weights_path is not None:
            raise
        raise InceptionWeightsUnavailable(
            f"cannot download or load the Inception-v3 weights ({type(err).__name__}): fetch {URL_INCEPTION_V3} "
            f"and pass weights_path=... or set {INCEPTION_WEIGHTS_ENV}=/path/to/file"
        ) from None
    if weights_path is None:
        weights_path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(URL_INCEPTION_V3))
        source = URL_INCEPTION_V3
    else:
        source = os.path.abspath(weights_path)
    identity = {"extractor": "inception", "implementation": "torch-fidelity FeatureExtractorInceptionV3",
                "weights": source, "weights_sha256": _sha256(weights_path)}
    return FeatureExtractor("inception", module.to(device), device, identity, label_classifier=False)


def _load_digits(weights_path: str | None, device: torch.device) -> FeatureExtractor:
    from tokencache.data.digits import DIGITS_CLASSES
    from tokencache.metrics.digits_evaluator import (
        TORCH_FIDELITY_NAME,
        DigitsFeatureExtractor,
        load_digits_evaluator,
        train_digits_evaluator,
    )

    weights_path = weights_path or os.environ.get(DIGITS_WEIGHTS_ENV) or None
    if weights_path is None:
        warnings.warn(f"no digits evaluator given (weights_path or {DIGITS_WEIGHTS_ENV}): training one in memory, seed 0")
        net = train_digits_evaluator(seed=0)
        identity = {"weights": "trained in memory, seed 0", "weights_sha256": _state_sha256(net)}
    else:
        net = load_digits_evaluator(weights_path)
        identity = {"weights": os.path.abspath(weights_path), "weights_sha256": _sha256(weights_path)}
    module = DigitsFeatureExtractor(TORCH_FIDELITY_NAME, ["pool", "spatial", "logits"], net=net)
    identity = {"extractor": "digits", "implementation": "tokencache DigitsNet",
                "test_accuracy": net.meta.get("test_accuracy"), **identity}
    return FeatureExtractor("digits", module.to(device), device, identity, label_classifier=True,
                            num_classes=DIGITS_CLASSES)


EXTRACTORS: dict[str, Callable[[str | None, torch.device], FeatureExtractor]] = {
    "inception": _load_inception,
    "digits": _load_digits,
}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_extractor(
    name: str = "inception", weights_path: str | os.PathLike | None = None, device: str | torch.device | None = None
) -> FeatureExtractor:
    """Build the named extractor (``"inception"`` or ``"digits"``) on ``device``."""
    if name not in EXTRACTORS:
        raise ValueError(f"unknown feature extractor {name!r}: use one of {sorted(EXTRACTORS)}")
    device = torch.device(device) if device is not None else default_device()
    return EXTRACTORS[name](None if weights_path is None else os.fspath(weights_path), device)


def _to_nchw_rgb(batch: np.ndarray) -> torch.Tensor:
    """uint8 NHWC (or NHW) → uint8 NCHW with 3 channels, grey repeated."""
    x = torch.from_numpy(np.ascontiguousarray(batch))
    if x.dim() == 3:
        x = x.unsqueeze(-1)
    x = x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()


@torch.no_grad()
def extract_features(
    images_uint8: np.ndarray,
    extractor: str | FeatureExtractor = "inception",
    batch_size: int = 64,
    weights_path: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Features of uint8 images (N, H, W, C) with C in {1, 3}, as float32 arrays.

    Returns ``{"pool": (N, Dp), "spatial": (N, Ds), "logits": (N, K), "probs": (N, K)}`` with
    ``probs = softmax(logits)`` in float32 as ADM computes it. ``extractor`` is a name (then
    ``weights_path``/``device`` build it) or an already loaded ``FeatureExtractor``.
    """
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise ValueError(f"expected uint8 images (N, H, W, C) with C in (1, 3), got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise ValueError("extract_features got no images")
    if isinstance(extractor, str):
        extractor = load_extractor(extractor, weights_path, device)
    outputs: dict[str, list[np.ndarray]] = {"pool": [], "spatial": [], "logits": [], "probs": []}
    with tqdm(total=len(images), desc=f"{extractor.name} features", unit="img", disable=not progress) as bar:
        for start in range(0, len(images), batch_size):
            batch = _to_nchw_rgb(images[start : start + batch_size]).to(extractor.device)
            pool, spatial, logits = extractor.module(batch)
            outputs["pool"].append(pool.float().cpu().numpy())
            outputs["spatial"].append(spatial.float().cpu().numpy())
            outputs["logits"].append(logits.float().cpu().numpy())
            outputs["probs"].append(torch.softmax(logits.float(), dim=1).cpu().numpy())
            bar.update(len(batch))
    return {key: np.concatenate(parts, axis=0) for key, parts in outputs.items()}
