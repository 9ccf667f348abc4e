"""results/gpu/run.sh, the one-command H200 measurement, end to end on the CPU (``--dry-run``)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(1200)  # run.sh may take its own 900 s
def test_the_gpu_script_runs_end_to_end_on_the_cpu(tmp_path):
    results, out = tmp_path / "results", tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHON=sys.executable, RESULTS=str(results), OUT=str(out), OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["bash", str(ROOT / "results" / "gpu" / "run.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    listed = subprocess.run([sys.executable, "-m", "tokencache", "methods", "--json"], env=env, check=True,
                            capture_output=True, text=True)
    methods = {m["name"] for m in json.loads(listed.stdout)}  # what the script's processes register
    names = {p.name for p in out.iterdir()}
    assert names == {"dit_eager.json", "dit_compiled.json", "mdt_eager.json", "latency.csv", "latency.md",
                     "realization_ratio.png", "run.log"} and len(names) <= 8  # the device tool returns ≤ 8 files
    for name in ("dit_eager.json", "dit_compiled.json", "mdt_eager.json"):
        rows = json.loads((out / name).read_text())["rows"]
        assert {r["method"] for r in rows} == methods, name
    compiled = json.loads((out / "dit_compiled.json").read_text())["rows"]
    assert {r["provenance"]["compile_mode"] for r in compiled} == {"default"}
    table = pd.read_csv(out / "latency.csv")
    assert len(table) == 2 * 2 * len(methods) + len(methods)
    last = done.stdout.strip().splitlines()
    header = next(i for i, line in enumerate(last) if "realization" in line and "label" in line)
    assert len(last) - header - 1 == len(table)  # the short table is the last thing printed
