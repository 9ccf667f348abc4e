"""Where and how a result was computed: the machine, the math libraries' code paths, versions.

Floating-point results of the same code move with the CPU (torch dispatches its kernels to the
widest vector ISA the CPU has, oneDNN and MKL pick theirs too), the thread count (how sums are
split) and the library versions. :func:`provenance` records all of that with every run, metrics
and latency JSON, so two results that differ can be told apart by what differs.

:func:`idle_cpus` is what ``--threads`` defaults to: of the CPUs this process may run on
(:func:`available_cpus`: affinity mask, cgroup CPU quota), those no other process is using at the
start. Torch's threads wait for each other at every operation, so one thread that shares its core
with another process slows all of them (1.6–1.9× slower than one thread with one or two busy
processes on two cores, ``workflow/scripts/threads_benchmark.py``), while on idle cores more
threads pay off even for the digits testbed's models.
"""
from __future__ import annotations

import functools
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

#: environment variables that change which kernels the math libraries run (recorded when set)
NUMERIC_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS",
               "MKL_NUM_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "CUBLAS_WORKSPACE_CONFIG")


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup (v2 or v1) CPU quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def cpu_times() -> tuple[int, int]:
    """(idle, total) time of all CPUs since boot, in clock ticks (``/proc/stat``'s first line:
    idle + iowait, and user … steal)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])


def idle_cpus(window_s: float = 0.2) -> int:
    """CPUs of this process's share that no other process is using right now, at least 1.

    Measured from ``/proc/stat`` over ``window_s`` (the share of idle time of all CPUs, times the
    CPU count), not from the load average, which lags by a minute. Elsewhere than Linux: all
    :func:`available_cpus`.
    """
    try:
        idle0, total0 = cpu_times()
        time.sleep(window_s)
        idle1, total1 = cpu_times()
    except (OSError, ValueError, IndexError):
        return available_cpus()
    share = (idle1 - idle0) / max(1, total1 - total0)
    return max(1, min(available_cpus(), round(share * (os.cpu_count() or 1))))


def _cgroup_quota() -> Optional[float]:
    """CPUs allowed by the cgroup's quota (``cpu.max`` or ``cpu.cfs_quota_us``), None if unlimited."""
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def load_average() -> Optional[float]:
    """The 1-minute load average (runnable processes, all users), None where the OS has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, ``sysctl`` on macOS, else the platform's word)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                 timeout=5)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def git_commit() -> Optional[str]:
    """The commit of the source tree this package runs from (``+dirty`` if it has changes), or None."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def provenance(device: Optional[str] = None) -> dict:
    """The machine and software a result was computed with (JSON-serialisable).

    ``cpu_capability`` is the ISA torch dispatches its own kernels to (``AVX512``, ``AVX2``,
    ``DEFAULT``, …; ``ATEN_CPU_CAPABILITY`` lowers it), ``threads`` torch's intra-op threads.
    """
    import numpy as np
    import torch

    import tokencache

    info = {
        "cpu_model": cpu_model(),
        "cpu_capability": _cpu_capability(),
        "machine": platform.machine(),
        "os": platform.platform(),
        "cpus_available": available_cpus(),
        "cpus_total": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average_1min": load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "tokencache": tokencache.__version__,
        "git_commit": git_commit(),
        "env": {k: os.environ[k] for k in NUMERIC_ENV if k in os.environ},
    }
    if device is not None:
        info["device"] = str(device)
        if str(device).startswith("cuda") and torch.cuda.is_available():
            info["device_name"] = torch.cuda.get_device_name(torch.device(device))
            info["cuda"] = torch.version.cuda
    return info


def _cpu_capability() -> Optional[str]:
    import torch

    get = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    try:
        return str(get()) if get is not None else None
    except RuntimeError:
        return None
