"""Wall-clock latency of caching methods, measured side by side in one process.

How (PROTOCOL.md, "Latency"):

* every method runs in the same process, interleaved — for each repeat, for each batch size, for
  each method — so drift of a shared machine (thermal, other jobs) hits all methods alike;
* ``warmup`` rounds of that loop come first and are not recorded (allocator, kernel selection);
* on CUDA the device is synchronised before each clock read (``torch.cuda.synchronize()``
  around ``time.perf_counter()``); on CPU the clock is read directly;
* the sampling loop (noise → latents, the transformer) is timed apart from end-to-end (labels
  and noise generators + sampling + VAE decode when a VAE is given + copy to host);
* per (method, batch size): median and spread (quartiles, min, max) of the recorded repeats,
  images/s, speed-up over the ``full`` row of the same batch size, the MACs speed-up from the
  engine's counts (:func:`tokencache.metrics.flops.sampling_macs`) and the realization ratio
  latency speed-up ÷ MACs speed-up (ToCa #11: 2.4× fewer MACs gave 1.07× on a 3090);
* peak memory of the sampling loop: ``torch.cuda.max_memory_allocated`` on CUDA (reset before each
  run, read before the VAE decode); on CPU the growth of the resident set over the loop, read
  while the method's caches are still alive (psutil), or without psutil the growth of the
  process's peak RSS (``ru_maxrss``; a high-water mark, so 0 once an earlier run peaked higher)
  — ``memory_kind`` says which.

Noise and labels come from ``sample_generators(seed, range(batch))`` made fresh for every run
(CPU generators, as ``tokencache sample`` draws them, so the per-step noise draws and their copy
to the device are inside the timed loop for every method alike); every method samples exactly
the same images. No ``torch.compile`` (compile mode "none").
"""
from __future__ import annotations

import contextlib
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from tokencache.cache import attach, get_method
from tokencache.metrics.flops import cfg_rows_per_image, sampling_macs
from tokencache.sampling import draw_labels, generate, parse_sampler, sample_generators

#: the clock; tests replace it to check the bookkeeping.
_clock = time.perf_counter

DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _now(device: torch.device) -> float:
    """A clock read after every queued kernel of ``device`` has finished."""
    _sync(device)
    return _clock()


def _spread(values: Sequence[float]) -> dict:
    """Median, quartiles, min, max and the values themselves (seconds)."""
    a = np.asarray(values, dtype=np.float64)
    q1, median, q3 = np.percentile(a, [25, 50, 75])
    return {"median": float(median), "q1": float(q1), "q3": float(q3), "iqr": float(q3 - q1),
            "min": float(a.min()), "max": float(a.max()), "values": [float(v) for v in a]}


# --------------------------------------------------------------------------- memory


def _rss_bytes() -> Optional[int]:
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


def _maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB, macOS bytes
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


class _Memory:
    """Peak memory of one run: CUDA peak allocated, or CPU resident growth (see module doc)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.kind = "cuda_max_memory_allocated_bytes"
        elif _rss_bytes() is not None:
            self.kind = "cpu_rss_growth_bytes (psutil, read after sampling with the caches alive)"
        else:
            self.kind = "cpu_ru_maxrss_growth_bytes (process high-water mark)"

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.before = _rss_bytes() if "psutil" in self.kind else _maxrss_bytes()

    def stop(self) -> Optional[int]:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        after = _rss_bytes() if "psutil" in self.kind else _maxrss_bytes()
        return None if after is None else int(after - self.before)


# --------------------------------------------------------------------------- provenance


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> Optional[str]:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance(device: torch.device, dtype: str = "float32") -> dict:
    """Everything that moves a latency number: device, versions, dtype, TF32, attention backend."""
    info = {
        "device": str(device),
        "device_name": _cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu_model": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "driver_version": None,
        "dtype": dtype,
        "autocast": dtype != "float32",
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "sdpa_backends": {
            "flash": bool(torch.backends.cuda.flash_sdp_enabled()),
            "mem_efficient": bool(torch.backends.cuda.mem_efficient_sdp_enabled()),
            "math": bool(torch.backends.cuda.math_sdp_enabled()),
            "cudnn": bool(getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: False)()),
        },
        "compile_mode": "none",
        "git_commit": _git_commit(),
    }
    if device.type == "cuda":
        driver = getattr(torch._C, "_cuda_getDriverVersion", None)
        info["driver_version"] = driver() if driver is not None else None
        props = torch.cuda.get_device_properties(device)
        info["device_memory_bytes"] = int(props.total_memory)
        info["compute_capability"] = f"{props.major}.{props.minor}"
    return info


# --------------------------------------------------------------------------- one run


def _run_once(model, method_name: str, params: dict, sampler: str, batch_size: int, cfg_scale: float,
              scale_pow, seed: int, device: torch.device, autocast, vae, memory: _Memory) -> dict:
    """Sample one batch with ``method``; return timings, peak memory and the engine's summary."""
    with attach(model, get_method(method_name, **params), sampler) as engine:
        memory.start()
        start = _now(device)
        gens = sample_generators(seed, range(batch_size))  # CPU generators, as `tokencache sample`
        labels = draw_labels(gens, model.num_classes)
        with torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext():
            loop_start = _now(device)
            x = generate(model, engine.sampler, labels, gens, cfg_scale=cfg_scale, scale_pow=scale_pow,
                         step_listener=engine.step_listener)
            loop_end = _now(device)
            peak = memory.stop()  # before decode: the transformer's memory, caches still alive
            if vae is not None:
                from tokencache.models.vae import decode_latents

                x = decode_latents(vae, x.to(next(vae.parameters()).dtype))
        x = x.float().cpu()
        end = _now(device)
        summary = engine.summary(counts=True)
    return {"sampling_s": loop_end - loop_start, "end_to_end_s": end - start, "peak_memory_bytes": peak,
            "summary": summary}


# --------------------------------------------------------------------------- the measurement


def measure_latency(model: torch.nn.Module, methods: Sequence[tuple[str, str, dict]], sampler: str = "ddim50",
                    batch_sizes: Sequence[int] = (1,), cfg_scale: float = 1.5, repeats: int = 5, warmup: int = 1,
                    device: Optional[str] = None, dtype: Optional[str] = None, vae=None, seed: int = 0,
                    scale_pow: Optional[float] = None,
                    on_run: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Time ``methods`` (``(label, method_name, params)``) interleaved; one row per (method, batch).

    ``sampler`` is the requested sampler (``steps`` runs its reduced one); ``dtype`` None or
    "float32" runs as is, "bfloat16"/"float16" run the sampling under ``torch.autocast`` (weights
    stay float32). ``device`` None keeps the model's device (the model is moved in place otherwise).
    ``on_run(event)`` is called after
    every run with {"round", "warmup", "batch_size", "label"} (call order, for checks and logs).

    Row keys: label, method, params, batch_size, sampler, requested_sampler, cfg_scale, repeats,
    warmup, sampling_s / end_to_end_s ({median, q1, q3, iqr, min, max, values}),
    images_per_s (batch ÷ median sampling time), images_per_s_end_to_end, speedup and
    speedup_end_to_end (median of the ``full`` row of this batch size ÷ this median; None
    without a ``full`` row), macs_per_image, macs_per_image_full, macs_speedup,
    overhead_macs_per_image, realization_ratio (speedup ÷ macs_speedup), peak_memory_bytes
    (median over repeats), memory_kind, vae_decode (bool), provenance.
    """
    if not methods:
        raise ValueError("measure_latency needs at least one method")
    if repeats < 1 or warmup < 0 or not batch_sizes or min(batch_sizes) < 1:
        raise ValueError("repeats ≥ 1, warmup ≥ 0 and batch sizes ≥ 1 are required")
    labels = [label for label, _, _ in methods]
    if len(set(labels)) != len(labels):
        raise ValueError(f"method labels must be unique, got {labels}")
    dtype_name = dtype or "float32"
    if dtype_name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    for _, name, params in methods:  # bad names/params fail before anything is timed
        get_method(name, **params)
    parse_sampler(sampler)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda was asked for but torch sees no CUDA device")
    model = model.to(dev).eval()
    if vae is not None:
        vae = vae.to(dev).eval()
    family = model.config["family"] if hasattr(model, "config") else type(model).__name__
    cfg = cfg_rows_per_image(family, cfg_scale) == 2
    memory = _Memory(dev)

    records: dict[tuple[str, int], list[dict]] = {(label, b): [] for label in labels for b in batch_sizes}
    for round_index in range(warmup + repeats):
        for b in batch_sizes:
            for label, name, params in methods:
                result = _run_once(model, name, params, sampler, b, cfg_scale, scale_pow, seed, dev,
                                   DTYPES[dtype_name], vae, memory)
                is_warmup = round_index < warmup
                if not is_warmup:
                    records[(label, b)].append(result)
                if on_run is not None:
                    on_run({"round": round_index, "warmup": is_warmup, "batch_size": b, "label": label})

    prov = provenance(dev, dtype_name)
    rows = []
    for b in batch_sizes:
        for label, name, params in methods:
            runs = records[(label, b)]
            summary = runs[-1]["summary"]
            macs = sampling_macs(model, summary, cfg=cfg)
            sampling = _spread([r["sampling_s"] for r in runs])
            e2e = _spread([r["end_to_end_s"] for r in runs])
            peaks = [r["peak_memory_bytes"] for r in runs if r["peak_memory_bytes"] is not None]
            rows.append({
                "label": label, "method": name, "params": dict(params), "batch_size": b,
                "sampler": summary["sampler"], "requested_sampler": summary["requested_sampler"],
                "cfg_scale": cfg_scale, "repeats": repeats, "warmup": warmup,
                "sampling_s": sampling, "end_to_end_s": e2e,
                "images_per_s": b / sampling["median"], "images_per_s_end_to_end": b / e2e["median"],
                "macs_per_image": macs["macs_per_image"], "macs_per_image_full": macs["macs_per_image_full"],
                "macs_speedup": macs["macs_speedup"], "overhead_macs_per_image": macs["overhead_macs_per_image"],
                "cfg_included": macs["cfg_included"],
                "peak_memory_bytes": int(np.median(peaks)) if peaks else None, "memory_kind": memory.kind,
                "vae_decode": vae is not None, "provenance": prov,
            })
    _add_speedups(rows)
    return rows


def _add_speedups(rows: list[dict]) -> None:
    """Speed-up over the ``full`` row of the same batch size, and the realization ratio."""
    full = {}
    for row in rows:
        if row["method"] == "full":
            full.setdefault(row["batch_size"], row)
    for row in rows:
        ref = full.get(row["batch_size"])
        if ref is None:
            row["speedup"] = row["speedup_end_to_end"] = row["realization_ratio"] = None
            continue
        row["speedup"] = ref["sampling_s"]["median"] / row["sampling_s"]["median"]
        row["speedup_end_to_end"] = ref["end_to_end_s"]["median"] / row["end_to_end_s"]["median"]
        row["realization_ratio"] = row["speedup"] / row["macs_speedup"]


# --------------------------------------------------------------------------- tables


TABLE_COLUMNS = ["label", "method", "batch_size", "sampler", "sampling_median_s", "sampling_iqr_s",
                 "end_to_end_median_s", "images_per_s", "speedup", "macs_g_per_image", "macs_speedup",
                 "overhead_macs_g_per_image", "realization_ratio", "peak_memory_mib"]


def latency_table(rows: list[dict]):
    """The rows as a flat pandas DataFrame (units in the column names)."""
    import pandas as pd

    flat = [{
        "label": r["label"], "method": r["method"], "batch_size": r["batch_size"], "sampler": r["sampler"],
        "sampling_median_s": r["sampling_s"]["median"], "sampling_iqr_s": r["sampling_s"]["iqr"],
        "end_to_end_median_s": r["end_to_end_s"]["median"], "images_per_s": r["images_per_s"],
        "speedup": r["speedup"], "macs_g_per_image": r["macs_per_image"] / 1e9, "macs_speedup": r["macs_speedup"],
        "overhead_macs_g_per_image": r["overhead_macs_per_image"] / 1e9,
        "realization_ratio": r["realization_ratio"],
        "peak_memory_mib": None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / 2**20,
    } for r in rows]
    return pd.DataFrame(flat, columns=TABLE_COLUMNS)


def write_latency_table(rows: list[dict], csv: Optional[str] = None, md: Optional[str] = None):
    """Write the table as CSV and/or Markdown (with the provenance and memory kind below it)."""
    table = latency_table(rows)
    if csv is not None:
        table.to_csv(csv, index=False)
    if md is not None:
        prov = rows[0]["provenance"] if rows else {}
        lines = [table.to_markdown(index=False, floatfmt=".4g"), "",
                 f"Memory: {rows[0]['memory_kind'] if rows else '-'}. MACs per generated image, CFG included: "
                 f"{rows[0]['cfg_included'] if rows else '-'}.", "",
                 "Provenance: " + ", ".join(f"{k}={v}" for k, v in prov.items())]
        Path(md).write_text("\n".join(lines) + "\n")
    return table
