"""workflow/scripts/slurm_local.sh: a one-node SLURM on this machine runs part of the workflow
through workflow/profiles/slurm, every job an sbatch job, and leaves no daemon behind.

Needs root (slurmctld, slurmd and munged run as root) and Debian's SLURM and MUNGE packages, which
the script installs through apt when they are missing. The default run (config/rehearsal.yaml's
DiT-XL/2 stand-in, DDIM-50, full, fora3 and l2c, two shards per run: 16 sbatch jobs, the
downloads local) took 8.5 to 11 minutes on a busy 2-core machine (load 3 to 4.5), most of it the
jobs' own Snakemake and torch start-up; the smoke subset (config/smoke.yaml, 19 jobs) 5 to 7.
"""
import csv
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "workflow" / "scripts" / "slurm_local.sh"
PROFILE = yaml.safe_load((ROOT / "workflow" / "profiles" / "slurm" / "config.yaml").read_text())
DAEMONS = {"/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/slurmstepd", "/usr/sbin/munged"}


def reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
        return True
    except OSError:
        return False


def apt_hosts() -> set[str]:
    """The hosts of apt's sources (one-line and deb822 formats)."""
    files = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
    text = "\n".join(f.read_text(errors="replace") for f in files if f.is_file())
    return set(re.findall(r"https?://([^/\s:]+)", text))


def why_not_runnable() -> str | None:
    """Why the script cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root: slurmctld, slurmd and munged run as root (run pytest as root)"
    if not all(shutil.which(exe) for exe in ("slurmctld", "slurmd", "sbatch", "munged")):
        hosts = apt_hosts()
        if not shutil.which("apt-get") or not any(reachable(h, 80) for h in hosts):
            return "SLURM and MUNGE are not installed and apt cannot reach its sources: apt-get install slurmctld slurmd slurm-client munge"
    return None


def daemon_pids() -> set[int]:
    """Processes of SLURM's and MUNGE's daemons (and job steps) on this machine."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if os.readlink(proc / "exe") in DAEMONS:
                    pids.add(int(proc.name))
            except OSError:
                pass
    return pids


def partition_of(rule: str) -> str:
    """The partition the profile asks for ``rule``."""
    return PROFILE.get("set-resources", {}).get(rule, {}).get("slurm_partition", PROFILE["default-resources"]["slurm_partition"])


@pytest.mark.slow
@pytest.mark.timeout(2400)  # slurm_local.sh may take its own 1800 s
@pytest.mark.skipif(why_not_runnable() is not None, reason=str(why_not_runnable()))
def test_slurm_profile_on_a_one_node_cluster(tmp_path):
    scratch = tmp_path / "slurm"
    name = f"slurm-test-{os.getpid()}"
    results = ROOT / "results" / name
    env = dict(os.environ, TOKENCACHE_SLURM_DIR=str(scratch), SLURM_LOCAL_NAME=name, OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    before = daemon_pids()
    start = time.monotonic()
    try:
        done = subprocess.run([str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        wall = time.monotonic() - start
        print(f"slurm_local.sh: {wall:.0f} s")
        assert done.returncode == 0, done.stderr[-4000:]
        assert daemon_pids() <= before, "a SLURM or MUNGE daemon was left running"
        assert not os.path.lexists("/etc/slurm/slurm.conf"), "the link /etc/slurm/slurm.conf was left behind"

        config = yaml.safe_load((scratch / "config.yaml").read_text())
        assert len(config["backbones"]) == 1 and len(config["samplers"]) == 1
        methods = set(config["methods"])
        assert len(methods) == 3 and "full" in methods
        with open(results / "tables" / "main.csv") as f:
            assert {row["method"] for row in csv.DictReader(f)} == methods, "the main table lacks a run"

        # every job SLURM ran, from its job-completion log: all completed, none with a GPU
        jobs = {}
        for line in (scratch / "jobcomp.txt").read_text().splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            jobs[fields["JobId"]] = fields
        assert jobs and all(j["JobState"] == "COMPLETED" for j in jobs.values()), jobs
        assert not any("gpu" in j["Tres"] for j in jobs.values()), "a job asked for a GPU"
        # … and each was submitted by the plugin for one rule (its log: slurm_logs/rule_R/[wildcards/]ID.log)
        rule_of = {log.stem: log.relative_to(scratch / "slurm_logs").parts[0].removeprefix("rule_")
                   for log in (scratch / "slurm_logs").rglob("*.log")}
        assert set(rule_of) == set(jobs), (sorted(rule_of), sorted(jobs))
        assert len(re.findall(r"has been submitted with SLURM jobid \d+", done.stderr)) == len(jobs)
        rules = sorted(rule_of.values())
        assert rules.count("sample_shard") == 3 * 2, rules  # three methods in two shards each
        assert rules.count("merge_shards") == 3 and rules.count("calibrate") == 1, rules
        assert {"tables", "plots", "sample_grid"} <= set(rules), rules
        assert not any(r.startswith("download") for r in rules), "a download (a local rule) went to SLURM"
        assert rules.count("evaluate") + rules.count("evaluate_inception") == 3, rules
        for job_id, rule in rule_of.items():  # in the profile's partition
            assert jobs[job_id]["Partition"] == partition_of(rule), (rule, jobs[job_id]["Partition"])
        print(f"{len(jobs)} sbatch jobs: " + ", ".join(f"{r} {rules.count(r)}" for r in sorted(set(rules))))

        # a second start on the same scratch folder: a fresh cluster with both partitions, stopped again
        again = subprocess.run([str(SCRIPT), "--", "sinfo", "-h", "-o", "%P %a"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
        assert sorted(again.stdout.split("\n")[:2]) == ["cpu* up", "gpu up"], again.stdout
        assert daemon_pids() <= before, "a SLURM or MUNGE daemon was left running after the second start"
    finally:
        shutil.rmtree(results, ignore_errors=True)


def test_slurm_profile_agrees_with_the_workflow_profile():
    """Snakemake applies profiles/default on top of --profile and lets it win key by key: a key both
    set differently would silently not be the SLURM profile's."""
    default = yaml.safe_load((ROOT / "workflow" / "profiles" / "default" / "config.yaml").read_text())
    differ = {k: (PROFILE[k], default[k]) for k in PROFILE.keys() & default.keys() if PROFILE[k] != default[k]}
    assert not differ, f"profiles/default overrides the SLURM profile's {differ}"


def test_slurm_profile_leaves_the_gpu_request_to_the_rules():
    """The rules ask for GPUs (gpu=1, sampling gpus_per_job) only with device: cuda; a GPU resource
    in the profile would override theirs (GPUs for a CPU run, one GPU for a torchrun of eight)."""
    for rule, resources in PROFILE.get("set-resources", {}).items():
        assert not {"gpu", "gpus", "gres"} & set(resources), f"set-resources: {rule} sets a GPU resource"
    assert not {"gpu", "gpus", "gres"} & set(PROFILE["default-resources"])
