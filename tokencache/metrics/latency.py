"""Wall-clock latency of caching methods, measured side by side in one process.

How:

* every method runs in the same process, interleaved — for each repeat, for each batch size, for
  each method — so drift of a shared machine (thermal, other jobs) hits all methods alike;
* ``warmup`` rounds of that loop come first and are not recorded (allocator, kernel selection);
* on CUDA the device is synchronised before each clock read (``torch.cuda.synchronize()``
  around ``time.perf_counter()``); on CPU the clock is read directly;
* the sampling loop (noise → latents, the transformer) is timed apart from end-to-end (labels
  and noise generators + sampling + VAE decode when a VAE is given + copy to host);
* per (method, batch size): median and spread (quartiles, min, max) of the recorded repeats,
  images/s, speed-up over the reference (uncached) row of the same batch size, the MACs speed-up from the
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
the same images.

GPU options (issue 7; each recorded in the provenance): ``dtype`` runs the loop under
``torch.autocast`` (weights as given: cast them beforehand, e.g. ``model.to(torch.bfloat16)``,
to save autocast's per-call weight casts — ``weights_dtype``); ``tf32`` sets TF32 for cuBLAS
and cuDNN during the measurement; ``compile_mode`` compiles every block's attention and MLP
branch (:mod:`tokencache.models.compiled`, the same granularity for every method). Compiling
happens in the warm-up rounds, whose wall time is reported apart (``compile_warmup_s``, and per
row ``warmup_sampling_s``); ``graphs_compiled_while_timing`` must be 0 for honest numbers. On
CUDA the loop is also timed with CUDA events (``sampling_event_s``: device time between the
first and the last kernel the loop queued). Random router / predictor files for timing L2C and
methods with a calibration (router, predictor, fitted coefficients) without one:
:func:`random_calibration`.
"""
from __future__ import annotations

import contextlib
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from tokencache.cache import attach, get_method, method_class, write_random_calibration
from tokencache.errors import DeviceUnavailable
from tokencache.metrics.flops import cfg_rows_per_image, sampling_macs
from tokencache.models.compiled import COMPILE_MODES, compiled_branches, graphs_compiled, uses_cuda_graphs
from tokencache.models.layers import Attention
from tokencache.provenance import cpu_model, git_commit
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


def sdpa_backend(model: torch.nn.Module, rows: int, dtype: torch.dtype, device: torch.device) -> Optional[str]:
    """The kernel ``F.scaled_dot_product_attention`` picks for the model's full-token attention.

    Asks torch's dispatcher (``torch._fused_sdp_choice``) with the model's shapes, ``rows`` batch
    rows, the dtype attention sees and MDT's additive bias: e.g. "flash_attention" for DiT in
    bfloat16, "efficient_attention" for float32 or with a bias, "math" when no fused kernel
    applies. None where torch cannot say. Attention with an explicit map (ToCa's scoring steps)
    does not use SDPA; the engine counts those calls (``explicit_attention``).
    """
    attn = next((m for m in model.modules() if isinstance(m, Attention)), None)
    choose = getattr(torch, "_fused_sdp_choice", None)
    if attn is None or choose is None:
        return None
    n = int(model.num_tokens)
    q = torch.zeros(rows, attn.num_heads, n, attn.head_dim, dtype=dtype, device=device)
    mask = None if attn.rel_pos_bias is None else torch.zeros(1, attn.num_heads, n, n, dtype=dtype, device=device)
    try:
        choice = int(choose(q, q, q, mask, 0.0, False))
    except (RuntimeError, TypeError):
        return None
    from torch.nn.attention import SDPBackend

    names = {int(getattr(SDPBackend, k)): k.lower() for k in dir(SDPBackend) if k.isupper()}
    return names.get(choice, str(choice))


@contextlib.contextmanager
def tf32_mode(enabled: Optional[bool]):
    """TF32 for cuBLAS matmuls and cuDNN on (True) or off (False) inside; None leaves torch's setting.

    ``allow_tf32`` on the matmul side is the float32 matmul precision "high" (off: "highest");
    both settings are restored on exit.
    """
    if enabled is None:
        yield
        return
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def timing_provenance(device: torch.device, dtype: str = "float32", **extra) -> dict:
    """Everything that moves a latency number: device, versions, dtype, TF32, attention backend.

    The machine's CPU model and the source's commit come from :mod:`tokencache.provenance`, the
    one place that reads them (the run and metrics records use the same functions).

    ``extra`` adds or overrides fields (the measurement adds weights_dtype, tf32_requested,
    sdpa_backend, compile_mode, compile_backend, cuda_graphs, compile_warmup_s,
    graphs_compiled, graphs_compiled_while_timing, timer).
    """
    info = {
        "device": str(device),
        "device_name": cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu_model": cpu_model(),
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
        "git_commit": git_commit(),
    }
    info.update(extra)
    if device.type == "cuda":
        driver = getattr(torch._C, "_cuda_getDriverVersion", None)
        info["driver_version"] = driver() if driver is not None else None
        props = torch.cuda.get_device_properties(device)
        info["device_memory_bytes"] = int(props.total_memory)
        info["compute_capability"] = f"{props.major}.{props.minor}"
    return info


# --------------------------------------------------------------------------- one run


#: the method hooks whose time is the method's decision overhead
DECISION_HOOKS = ("begin_step", "block_action", "branch_action", "observe")


def _time_decisions(method, device: torch.device) -> dict:
    """Wrap ``method``'s hooks so that the time spent inside them adds up in the returned dict.

    The device is synchronised around each call, so the time includes the kernels the hook
    queued (scores, signals, forecasts, a predictor): slower than an unmeasured run, which is
    why this runs in a round of its own, never in the timed ones.
    """
    spent = {"decision_s": 0.0}
    for name in DECISION_HOOKS:
        hook = getattr(method, name, None)
        if hook is None:
            continue

        def timed(*args, _hook=hook, **kwargs):
            start = _now(device)
            try:
                return _hook(*args, **kwargs)
            finally:
                spent["decision_s"] += _now(device) - start

        setattr(method, name, timed)
    return spent


def _run_once(model, method_name: str, params: dict, sampler: str, batch_size: int, cfg_scale: float,
              scale_pow, seed: int, device: torch.device, autocast, vae, memory: _Memory,
              clone_stored: bool = False, time_decisions: bool = False) -> dict:
    """Sample one batch with ``method``; return timings, peak memory and the engine's summary.

    ``time_decisions``: also measure the time spent in the method's hooks (``decision_s``).
    """
    method = get_method(method_name, **params)
    spent = _time_decisions(method, device) if time_decisions else None
    with attach(model, method, sampler) as engine:
        engine.clone_stored = clone_stored
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if device.type == "cuda" else None
        memory.start()
        start = _now(device)
        gens = sample_generators(seed, range(batch_size))  # CPU generators, as `tokencache sample`
        labels = draw_labels(gens, model.num_classes)
        with torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext():
            loop_start = _now(device)
            if events:
                events[0].record()
            x = generate(model, engine.sampler, labels, gens, cfg_scale=cfg_scale, scale_pow=scale_pow,
                         step_listener=engine.step_listener)
            if events:
                events[1].record()
            loop_end = _now(device)
            peak = memory.stop()  # before decode: the transformer's memory, caches still alive
            if vae is not None:
                from tokencache.models.vae import decode_latents

                x = decode_latents(vae, x.to(next(vae.parameters()).dtype))
        x = x.float().cpu()
        end = _now(device)
        summary = engine.summary(counts=True)
    return {"sampling_s": loop_end - loop_start, "end_to_end_s": end - start, "peak_memory_bytes": peak,
            "sampling_event_s": events[0].elapsed_time(events[1]) / 1000 if events else None, "summary": summary,
            "decision_s": None if spent is None else spent["decision_s"]}


# --------------------------------------------------------------------------- the measurement


def measure_latency(model: torch.nn.Module, methods: Sequence[tuple[str, str, dict]], sampler: str = "ddim50",
                    batch_sizes: Sequence[int] = (1,), cfg_scale: float = 1.5, repeats: int = 5, warmup: int = 1,
                    device: Optional[str] = None, dtype: Optional[str] = None, vae=None, seed: int = 0,
                    scale_pow: Optional[float] = None, tf32: Optional[bool] = None, compile_mode: str = "none",
                    compile_backend: str = "inductor", notes: Optional[dict] = None,
                    on_run: Optional[Callable[[dict], None]] = None, decision_timing: bool = True) -> list[dict]:
    """Time ``methods`` (``(label, method_name, params)``) interleaved; one row per (method, batch).

    ``sampler`` is the requested sampler (a method may run another, e.g. fewer steps); ``dtype`` None or
    "float32" runs as is, "bfloat16"/"float16" run the sampling under ``torch.autocast``. The
    weights are used as they are (``weights_dtype`` in the provenance): float32 weights under
    autocast are cast at every call, bfloat16/float16 weights (cast beforehand) are not, and
    need autocast, which casts the float32 noise and activations. ``tf32`` True/False sets TF32
    during the measurement (None: torch's setting). ``compile_mode`` ("none", "default",
    "reduce-overhead", "max-autotune") compiles the block branches with ``compile_backend``
    (see :mod:`tokencache.models.compiled`); it needs ``warmup`` ≥ 1, and ≥ 2 where the
    branches become CUDA graphs (recorded at their second call, replayed from the third).
    ``device`` None keeps the model's device (the model is moved in place otherwise).
    ``notes`` ({label: text}) is copied into the rows (e.g. "random router, timing only").
    ``on_run(event)`` is called after every run with {"round", "warmup", "batch_size", "label"}
    (call order, for checks and logs). ``decision_timing``: after the timed rounds, one more round
    measures the time spent inside each method's hooks (its decisions: scores, signals, forecasts,
    a predictor), the device synchronised around each; not part of the timed statistics.

    Row keys: label, method, params, model, batch_size, sampler, requested_sampler, cfg_scale,
    repeats, warmup, sampling_s / end_to_end_s ({median, q1, q3, iqr, min, max, values}),
    sampling_event_s (the same from CUDA events; None off CUDA), warmup_sampling_s (the warm-up
    runs' loop times, compile included), images_per_s (batch ÷ median sampling time),
    images_per_s_end_to_end, speedup and speedup_end_to_end (median of the reference row of this
    batch size ÷ this median; None without one), macs_per_image,
    macs_per_image_full, macs_speedup, overhead_macs_per_image, realization_ratio (speedup ÷
    macs_speedup), peak_memory_bytes (median over repeats), memory_kind, vae_decode (bool),
    note, provenance.
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
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}")
    for _, name, params in methods:  # bad names/params fail before anything is timed
        get_method(name, **params)
    parse_sampler(sampler)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("device cuda was asked for but torch sees no CUDA device")
    graphs = uses_cuda_graphs(compile_mode, dev)
    if compile_mode != "none" and warmup < (2 if graphs else 1):
        raise ValueError(f"compile mode {compile_mode} needs warmup ≥ {2 if graphs else 1} (compiling"
                         f"{' and CUDA-graph recording' if graphs else ''} must not be timed)")
    weights_dtype = next(model.parameters()).dtype
    if weights_dtype != torch.float32 and DTYPES[dtype_name] is None:
        raise ValueError(f"the weights are {weights_dtype}: give dtype bfloat16/float16 (autocast casts the "
                         "float32 noise and activations to them)")
    model = model.to(dev).eval()
    if vae is not None:
        vae = vae.to(dev).eval()
    family = model.config["family"] if hasattr(model, "config") else type(model).__name__
    cfg = cfg_rows_per_image(family, cfg_scale) == 2
    memory = _Memory(dev)
    autocast = DTYPES[dtype_name]

    records: dict[tuple[str, int], list[dict]] = {(label, b): [] for label in labels for b in batch_sizes}
    warm: dict[tuple[str, int], list[float]] = {(label, b): [] for label in labels for b in batch_sizes}
    with tf32_mode(tf32), compiled_branches(model, compile_mode, compile_backend):
        compiled_at_start = graphs_compiled() if compile_mode != "none" else 0
        start = _now(dev)
        for round_index in range(warmup + repeats):
            if round_index == warmup:
                warmup_s = _now(dev) - start
                compiled_in_warmup = graphs_compiled() if compile_mode != "none" else 0
            for b in batch_sizes:
                for label, name, params in methods:
                    result = _run_once(model, name, params, sampler, b, cfg_scale, scale_pow, seed, dev,
                                       autocast, vae, memory, clone_stored=graphs)
                    is_warmup = round_index < warmup
                    (warm[(label, b)].append(result["sampling_s"]) if is_warmup
                     else records[(label, b)].append(result))
                    if on_run is not None:
                        on_run({"round": round_index, "warmup": is_warmup, "batch_size": b, "label": label})
        compiled_at_end = graphs_compiled() if compile_mode != "none" else 0
        decisions = {}
        if decision_timing:
            for b in batch_sizes:
                for label, name, params in methods:
                    decisions[(label, b)] = _run_once(model, name, params, sampler, b, cfg_scale, scale_pow, seed,
                                                      dev, autocast, vae, memory, clone_stored=graphs,
                                                      time_decisions=True)
        rows_per_image = 2 if cfg else 1
        attention_dtype = autocast or weights_dtype
        prov = timing_provenance(
            dev, dtype_name, weights_dtype=str(weights_dtype).replace("torch.", ""), tf32_requested=tf32,
            sdpa_backend={str(b): sdpa_backend(model, b * rows_per_image, attention_dtype, dev) for b in batch_sizes},
            compile_mode=compile_mode, compile_backend=None if compile_mode == "none" else compile_backend,
            cuda_graphs=graphs, compile_warmup_s=warmup_s,
            graphs_compiled=compiled_in_warmup - compiled_at_start,
            graphs_compiled_while_timing=compiled_at_end - compiled_in_warmup,
            timer="perf_counter after torch.cuda.synchronize + CUDA events" if dev.type == "cuda" else "perf_counter")

    rows = []
    model_name = getattr(model, "config", {}).get("name")
    for b in batch_sizes:
        for label, name, params in methods:
            runs = records[(label, b)]
            summary = runs[-1]["summary"]
            macs = sampling_macs(model, summary, cfg=cfg)
            sampling = _spread([r["sampling_s"] for r in runs])
            e2e = _spread([r["end_to_end_s"] for r in runs])
            events = [r["sampling_event_s"] for r in runs]
            peaks = [r["peak_memory_bytes"] for r in runs if r["peak_memory_bytes"] is not None]
            rows.append({
                "label": label, "method": name, "role": summary["role"], "params": dict(params),
                "resolved": summary["resolved"], "host_sync": summary["host_sync"],
                "host_syncs_per_run": summary["host_syncs"], "model": model_name, "batch_size": b,
                "sampler": summary["sampler"], "requested_sampler": summary["requested_sampler"],
                "cfg_scale": cfg_scale, "repeats": repeats, "warmup": warmup,
                "sampling_s": sampling, "end_to_end_s": e2e,
                "sampling_event_s": _spread(events) if None not in events else None,
                "warmup_sampling_s": warm[(label, b)],
                "images_per_s": b / sampling["median"], "images_per_s_end_to_end": b / e2e["median"],
                "macs_per_image": macs["macs_per_image"], "macs_per_image_full": macs["macs_per_image_full"],
                "macs_speedup": macs["macs_speedup"], "overhead_macs_per_image": macs["overhead_macs_per_image"],
                "cfg_included": macs["cfg_included"],
                "peak_memory_bytes": int(np.median(peaks)) if peaks else None, "memory_kind": memory.kind,
                "vae_decode": vae is not None, "note": (notes or {}).get(label), "provenance": prov,
                **_decision_columns(decisions.get((label, b))),
            })
    _add_speedups(rows)
    return rows


def _decision_columns(run: Optional[dict]) -> dict:
    """``decision_s`` (time inside the method's hooks in the decision round) and its share of that run."""
    if run is None:
        return {"decision_s": None, "decision_share": None}
    return {"decision_s": run["decision_s"], "decision_share": run["decision_s"] / run["sampling_s"]}


def _add_speedups(rows: list[dict]) -> None:
    """Speed-up over the reference (uncached) row of the same batch size, and the realization ratio."""
    full = {}
    for row in rows:
        if row["role"] == "reference":
            full.setdefault(row["batch_size"], row)
    for row in rows:
        ref = full.get(row["batch_size"])
        if ref is None:
            row["speedup"] = row["speedup_end_to_end"] = row["realization_ratio"] = None
            continue
        row["speedup"] = ref["sampling_s"]["median"] / row["sampling_s"]["median"]
        row["speedup_end_to_end"] = ref["end_to_end_s"]["median"] / row["end_to_end_s"]["median"]
        row["realization_ratio"] = row["speedup"] / row["macs_speedup"]


# --------------------------------------------------------------------------- calibration stand-ins


def random_calibration(methods: Sequence[tuple[str, str, dict]], model: torch.nn.Module, sampler: str,
                       directory, seed: int = 0) -> tuple[list, dict]:
    """Give every method that needs a calibration file and has none a random one (timing only).

    Latency does not need trained calibration where the cost does not depend on it, so each
    method's :class:`~tokencache.cache.calibration.Calibration` writes a random stand-in of the
    right shape (its :meth:`~tokencache.cache.calibration.Calibration.random`, documented per
    method) for ``model`` as it is now (device and weight dtype: the files carry a parameter
    checksum) into ``directory``. Where the values decide how much is computed (a router's
    reuse pattern), the row's speed-up is that of the stand-in while its realization ratio
    (speed-up ÷ MACs speed-up) stays comparable.

    Returns the updated method list and {label: note} for :func:`measure_latency`'s ``notes``.
    """
    spec = parse_sampler(sampler)
    directory = Path(directory)
    model_name = getattr(model, "config", {}).get("name") or type(model).__name__
    out, notes = [], {}
    for label, name, params in methods:
        params = dict(params)
        calibration = method_class(name).calibration
        if calibration is not None and not params.get(calibration.file_param):
            method = get_method(name, **params)
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in f"{model_name}-{label}")
            path = directory / f"{safe}-random-{calibration.file_param}-{spec.name}.pt"
            params[calibration.file_param] = write_random_calibration(method, model, spec, path, seed=seed)
            first_line = (calibration.random.__doc__ or "").strip().splitlines()[0:1]
            notes[label] = f"random {calibration.title} (timing only)" + (f": {first_line[0]}" if first_line else "")
        out.append((label, name, params))
    return out, notes


# --------------------------------------------------------------------------- tables


TABLE_COLUMNS = ["label", "method", "batch_size", "sampler", "sampling_median_s", "sampling_iqr_s",
                 "end_to_end_median_s", "images_per_s", "speedup", "macs_g_per_image", "macs_speedup",
                 "overhead_macs_g_per_image", "realization_ratio", "decision_share", "host_sync", "peak_memory_mib"]


def latency_table(rows: list[dict]):
    """The rows as a flat pandas DataFrame (units in the column names)."""
    import pandas as pd

    flat = [{
        "label": r["label"], "method": r["method"], "batch_size": r["batch_size"], "sampler": r["sampler"],
        "sampling_median_s": r["sampling_s"]["median"], "sampling_iqr_s": r["sampling_s"]["iqr"],
        "end_to_end_median_s": r["end_to_end_s"]["median"], "images_per_s": r["images_per_s"],
        "speedup": r["speedup"], "macs_g_per_image": r["macs_per_image"] / 1e9, "macs_speedup": r["macs_speedup"],
        "overhead_macs_g_per_image": r["overhead_macs_per_image"] / 1e9,
        "realization_ratio": r["realization_ratio"], "decision_share": r.get("decision_share"),
        "host_sync": r.get("host_sync"),
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
