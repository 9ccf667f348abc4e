"""The digits testbed's trained weights, shipped inside the package with their sha256.

Training the testbed's backbones takes minutes of CPU and — like any float computation — its
result depends on the CPU (vector width, library kernels): the same command on another x86-64
machine gives different weights from the first step on. So the default workflow does not train
them: it samples from these files, built once by the documented commands (:data:`COMMANDS`,
``python -m tokencache.weights`` rebuilds them into a folder and prints the manifest):

* ``DiT-digits`` and ``MDTv2-digits`` — EMA weights and the model's settings only
  (``train-backbone --ema-only``), a few MB each;
* ``digits-evaluator`` — the digits CNN that plays Inception's role (``train-evaluator``);
* ``digits-reference`` — its reference batch of the held-out digits (``reference``).

``manifest.json`` lists each file with its sha256, size, the command that built it and the
machine it was built on; :func:`shipped_path` checks the checksum before a file is used. In a
config, ``checkpoint: shipped`` (backbones) and ``testbed: {evaluator: shipped}`` select them; on
the command line, ``--checkpoint shipped:DiT-digits``, ``--weights shipped``, ``--reference shipped``.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

FOLDER = Path(__file__).resolve().parent
MANIFEST = FOLDER / "manifest.json"

#: name → (file, the command that builds it; ``{out}`` is the file, ``{evaluator}`` the evaluator's)
COMMANDS = {
    "DiT-digits": ("DiT-digits.pt", "tokencache train-backbone --model DiT-digits --steps 1000 --batch-size 32 --lr 0.01 "
                                    "--loss-weighting min_snr --seed 0 --threads 1 --ema-only --out {out}"),
    "MDTv2-digits": ("MDTv2-digits.pt", "tokencache train-backbone --model MDTv2-digits --steps 600 --batch-size 32 "
                                        "--lr 0.01 --loss-weighting min_snr --seed 0 --threads 1 --ema-only --out {out}"),
    "digits-evaluator": ("digits_cnn.pt", "tokencache train-evaluator --seed 0 --out {out}"),
    "digits-reference": ("digits_test_reference.npz",
                         "tokencache reference --features digits --weights {evaluator} --threads 1 --out {out}"),
}
PREFIX = "shipped:"


@functools.lru_cache(maxsize=None)
def manifest() -> dict:
    """The shipped files: name → {file, sha256, bytes, command, built_with}."""
    return json.loads(MANIFEST.read_text())


def shipped_names() -> list[str]:
    return list(manifest())


@functools.lru_cache(maxsize=None)
def shipped_path(name: str) -> Path:
    """The path of shipped file ``name`` after checking its sha256 (once per process).

    A name that is not shipped, or a file whose checksum does not match the manifest (a damaged
    install), is one ValueError line.
    """
    from tokencache.io import sha256_file

    entries = manifest()
    if name not in entries:
        raise ValueError(f"no shipped weights named {name!r}; shipped: {', '.join(entries)}")
    entry = entries[name]
    path = FOLDER / entry["file"]
    if not path.is_file():
        raise ValueError(f"shipped file {path} is missing: reinstall tokencache")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise ValueError(f"shipped file {path} is damaged (sha256 {digest[:12]}…, expected {entry['sha256'][:12]}…): "
                         f"reinstall tokencache")
    return path


def resolve(path_or_name) -> str:
    """``shipped:NAME`` → the shipped file's path (checked); anything else unchanged."""
    text = str(path_or_name)
    return str(shipped_path(text[len(PREFIX):])) if text.startswith(PREFIX) else path_or_name
