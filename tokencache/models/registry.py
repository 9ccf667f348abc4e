"""Model presets by name, like the official ``DiT_models`` / ``MDT_models`` dictionaries.

``create_model("DiT-XL/2")`` builds the official DiT-XL/2; ``create_model("MDTv2", depth=8, …)``
builds a family with explicit keywords. Overrides use the official constructor keywords.
"""
from __future__ import annotations

import inspect

from torch import nn

from tokencache.models.dit import DiT
from tokencache.models.mdt import MDT, MDTv2

FAMILIES: dict[str, type[nn.Module]] = {"DiT": DiT, "MDT": MDT, "MDTv2": MDTv2}

#: size name → (depth, hidden_size, num_heads), as in the DiT paper's Table 1.
SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
#: patch sizes each family publishes presets for.
PATCHES = {"DiT": (2, 4, 8), "MDT": (2, 4, 8), "MDTv2": (2,)}
#: keywords a preset fixes beyond its size (the official checkpoints' settings).
FAMILY_DEFAULTS = {"DiT": {}, "MDT": {"decode_layer": 2}, "MDTv2": {"decode_layer": 4}}


def _preset_table() -> dict[str, tuple[str, dict]]:
    table = {}
    for family, patches in PATCHES.items():
        for size, (depth, hidden, heads) in SIZES.items():
            for p in patches:
                kw = dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=p, **FAMILY_DEFAULTS[family])
                table[f"{family}-{size}/{p}"] = (family, kw)
    return table


PRESETS = _preset_table()

#: The digits testbed backbones: 8×8 one-channel pixels at patch 1 (64 tokens), 10 classes,
#: 8 blocks (MDTv2: 3 encoder-in, 3 encoder-out, 2 decoder), sized to train in minutes on a
#: 2-core CPU (see docs/testbed.md).
TESTBED = dict(input_size=8, patch_size=1, in_channels=1, num_classes=10, hidden_size=64, depth=8, num_heads=4)
PRESETS["DiT-digits"] = ("DiT", dict(TESTBED))
PRESETS["MDTv2-digits"] = ("MDTv2", dict(TESTBED, decode_layer=2, mask_ratio=0.3))


def model_names() -> list[str]:
    """Every preset and family name ``create_model`` accepts."""
    return list(PRESETS) + list(FAMILIES)


def resolve(name: str, **overrides) -> tuple[str, dict]:
    """Name + overrides → (family, constructor keywords); a clear error for unknown names/keys."""
    if name in PRESETS:
        family, kw = PRESETS[name]
        kw = dict(kw)
    elif name in FAMILIES:
        family, kw = name, dict(FAMILY_DEFAULTS[name])
    else:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(model_names())}")
    allowed = set(inspect.signature(FAMILIES[family].__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"{name}: unknown keyword(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    kw.update(overrides)
    return family, kw


def parse_override_value(raw: str):
    """A constructor keyword's value as typed on a command line (``--model-set depth=4``): a bool,
    None, an int, a float, or else the string."""
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def create_model(name: str, **overrides) -> nn.Module:
    """Build a model from a preset ("DiT-XL/2", "MDTv2-S/2", …) or a family ("DiT", "MDT", "MDTv2").

    The returned module records how it was built in ``model.config`` ({"name", "family", kwargs}),
    which checkpoints written by this package store so they can be rebuilt.
    """
    family, kw = resolve(name, **overrides)
    model = FAMILIES[family](**kw)
    model.config = {"name": name, "family": family, **kw}
    return model


def config_of(model: nn.Module) -> dict:
    """The constructor keywords of ``model`` (family + official keywords), from its attributes."""
    return dict(getattr(model, "config", {}))
