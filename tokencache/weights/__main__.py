"""``python -m tokencache.weights [FOLDER]``: build the shipped testbed files and their manifest.

Runs the documented commands (:data:`tokencache.weights.COMMANDS`) into FOLDER (default: a new
``shipped-weights`` folder; never the installed package) and writes ``manifest.json`` there
with each file's sha256, size, command and the machine it was built on. Copy the folder's files
over ``tokencache/weights/`` to ship them. About 8 minutes on one core of the reference CPU.
``--manifest-only`` writes the manifest of the files already in FOLDER.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from tokencache.weights import COMMANDS


def build(folder: Path, manifest_only: bool = False) -> dict:
    from tokencache.io import sha256_file, write_atomic
    from tokencache.provenance import provenance

    folder.mkdir(parents=True, exist_ok=True)
    evaluator = folder / COMMANDS["digits-evaluator"][0]
    entries = {}
    for name, (file, command) in COMMANDS.items():
        out = folder / file
        argv = shlex.split(command.format(out=out, evaluator=evaluator))
        if not manifest_only:
            print(" ".join(argv), file=sys.stderr)
            subprocess.run([sys.executable, "-m", "tokencache.cli", *argv[1:], "--quiet"], check=True,
                           stdout=subprocess.DEVNULL)
        entries[name] = {"file": file, "sha256": sha256_file(out), "bytes": out.stat().st_size,
                         "command": command.format(out=file, evaluator=COMMANDS["digits-evaluator"][0])}
    info = provenance()
    built_with = {k: info[k] for k in ("cpu_model", "cpu_capability", "torch", "numpy", "tokencache", "git_commit")}
    for entry in entries.values():
        entry["built_with"] = built_with
    write_atomic(folder / "manifest.json", entries)
    return entries


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokencache.weights", description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="shipped-weights")
    parser.add_argument("--manifest-only", action="store_true", help="only checksum the files already in FOLDER")
    args = parser.parse_args(argv)
    entries = build(Path(args.folder), args.manifest_only)
    for name, entry in entries.items():
        print(f"{name}: {entry['file']} {entry['bytes']} bytes sha256 {entry['sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
