"""Keep freed memory in the process instead of handing it back to the kernel (glibc only).

PyTorch's CPU tensors come from ``malloc``. glibc serves large blocks (the testbed's
activations are 10–30 MB at batch 400) with a fresh ``mmap`` and returns them with ``munmap`` when
freed, so every forward pass touches new pages and pays one page fault per 4 KiB. On the
reference machine (a sandboxed 2-core VM, where a fault is costly) one forward of DiT-digits at
batch 400 took 102,144 faults; with mmap off and trimming off it takes none and runs 1.2–1.4×
faster (``python -m tokencache._allocator`` measures it). The memory a process keeps is its own peak
working set, which the caching engine holds anyway. This is the same advice as PyTorch's CPU
performance guide (use an allocator that keeps memory: jemalloc, tcmalloc), done without
preloading a library.

``keep_freed_memory()`` is called by the ``tokencache`` CLI. Set ``TOKENCACHE_SYSTEM_MALLOC=1``
to leave malloc as it is; on non-glibc systems it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_MMAP_MAX = -4
_applied = False


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and never trim it; True if glibc accepted both."""
    global _applied
    if _applied:
        return True
    if os.environ.get("TOKENCACHE_SYSTEM_MALLOC") or not hasattr(os, "confstr"):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _applied = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, ValueError, AttributeError):
        return False
    return _applied


def _measure(batch: int = 400, repeats: int = 5) -> dict:
    """Minor page faults and the fastest time of one DiT-digits forward, in this process."""
    import resource
    import time

    import torch

    from tokencache.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("DiT-digits").eval()
    x, t, y = torch.randn(batch, 1, 8, 8), torch.randint(1000, (batch,)), torch.randint(10, (batch,))
    with torch.no_grad():
        model(x, t, y)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x, t, y)
            times.append(time.perf_counter() - start)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"faults_per_forward": faults // repeats, "forward_ms": round(min(times) * 1000, 1)}


if __name__ == "__main__":
    import json
    import subprocess
    import sys

    if len(sys.argv) > 1:  # child: measure with or without the setting, print JSON
        import torch

        torch.set_num_threads(1)
        applied = keep_freed_memory() if sys.argv[1] == "keep" else False
        print(json.dumps({"keep_freed_memory": applied, **_measure()}))
    else:  # parent: the two settings side by side, each in a fresh process, alternated
        rows = []
        for _ in range(2):
            for mode in ("system", "keep"):
                env = dict(os.environ, TOKENCACHE_SYSTEM_MALLOC="1" if mode == "system" else "")
                out = subprocess.run([sys.executable, "-m", "tokencache._allocator", mode], env=env,
                                     capture_output=True, text=True, check=True).stdout
                rows.append(json.loads(out))
        for row in rows:
            print(json.dumps(row))
