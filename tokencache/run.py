"""One sampling run: build the model from its checkpoint, sample in batches, write npz + JSON.

Sample ``i`` of a run is fully determined by ``(seed, i)`` (see :mod:`tokencache.sampling`), so a
run split into shards by ``start_index`` gives the same images as one run.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from tokencache.checks import check_output_file, sample_file_bytes
from tokencache.data.npz import save_samples_npz
from tokencache.errors import DeviceUnavailable
from tokencache.io import write_atomic
from tokencache.models.checkpoints import (
    OFFICIAL_WEIGHTS,
    extract_state_dict,
    load_checkpoint,
    read_checkpoint,
    sha256_of,
)
from tokencache.models.registry import create_model
from tokencache.models.vae import decode_latents, images_to_uint8, load_vae
from tokencache.provenance import provenance
from tokencache.sampling import draw_labels, generate, parse_sampler, sample_generators


@dataclass
class SampleRequest:
    """What ``tokencache sample`` was asked for."""

    checkpoint: str
    out: str
    model: Optional[str] = None
    overrides: dict = field(default_factory=dict)
    sampler: str = "ddim50"
    cfg_scale: float = 1.5
    scale_pow: float = 4.0
    num_samples: int = 64
    batch_size: int = 64
    seed: int = 0
    start_index: int = 0
    vae: str = "ema"
    device: str = "auto"
    clip_denoised: bool = False
    method: Optional[str] = None  # None: the uncached reference
    method_params: dict = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceUnavailable("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def build_model(checkpoint: str, model: Optional[str] = None, overrides: Optional[dict] = None):
    """The model a checkpoint belongs to, weights loaded (EMA where present), in eval mode.

    The architecture comes from ``model`` + ``overrides`` if given, else from the checkpoint's
    recorded ``args["model_config"]`` (train-backbone checkpoints), else from the file name of
    an official checkpoint.
    """
    obj = read_checkpoint(checkpoint)
    overrides = dict(overrides or {})
    if model is None:
        recorded = obj.get("args", {}).get("model_config") if isinstance(obj, dict) else None
        official = OFFICIAL_WEIGHTS.get(os.path.basename(checkpoint))
        if isinstance(recorded, dict):
            recorded = dict(recorded)
            model = recorded.pop("name")
            recorded.pop("family", None)
            overrides = {**recorded, **overrides}
        elif official is not None:
            model, overrides = official.preset, {**official.overrides, **overrides}
        else:
            raise ValueError(f"{checkpoint} records no architecture: pass --model (e.g. DiT-XL/2)")
    net = create_model(model, **overrides)
    load_checkpoint(net, extract_state_dict(obj))
    return net.eval().requires_grad_(False)


def run_sampling(req: SampleRequest, progress: bool = True) -> dict:
    """Sample ``req.num_samples`` images to ``req.out`` (npz) and ``<out>.json``; return the summary.

    The method is attached through the caching engine; the JSON holds its per-step counts of
    computed tokens (summed over batches), from which MACs are derived. Started by ``torchrun``
    (several processes, ``WORLD_SIZE`` > 1), the samples are split between the processes
    (:func:`sample_data_parallel`); the files are the same as one process writes.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        return sample_data_parallel(req, progress)
    return _sample(req, progress)


def rank_ranges(start: int, count: int, world: int) -> list[tuple[int, int]]:
    """(first index, count) of each of ``world`` processes: contiguous parts differing by at most one."""
    base, extra = divmod(count, world)
    out, first = [], start
    for rank in range(world):
        size = base + (rank < extra)
        out.append((first, size))
        first += size
    return out


def sample_data_parallel(req: SampleRequest, progress: bool = True) -> dict:
    """One machine, several processes (``torchrun --nproc_per_node N -m tokencache sample …``).

    Each rank samples its own contiguous part of the indices on its own device (``cuda:LOCAL_RANK``,
    or the CPU with the gloo backend) into a part file beside ``req.out``; rank 0 then merges the
    parts in index order into ``req.out`` and its JSON and removes them. Sample i depends only on
    (seed, i), so the merged images equal a single process's. Every rank returns the summary.
    """
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    gpu = req.device != "cpu" and torch.cuda.is_available()
    dist.init_process_group("nccl" if gpu else "gloo")
    try:
        out = Path(req.out)
        parts = [(first, size, out.with_name(f".{out.stem}.part{r}-of-{world}.npz"))
                 for r, (first, size) in enumerate(rank_ranges(req.start_index, req.num_samples, world))]
        first, size, mine = parts[rank]
        start = time.perf_counter()
        if size:
            device = f"cuda:{local_rank}" if gpu else "cpu"
            _sample(replace(req, start_index=first, num_samples=size, out=str(mine), device=device),
                    progress and rank == 0)
        seconds = [None] * world
        dist.all_gather_object(seconds, round(time.perf_counter() - start, 2))
        dist.barrier()
        if rank == 0:
            files = [str(path) for _, n, path in parts if n]
            summary = merge_shards(files, str(out))
            summary.update(request=asdict(req), seconds=max(seconds),
                           data_parallel={"world_size": world, "backend": dist.get_backend(),
                                          "seconds_per_rank": seconds})
            write_atomic(out.with_suffix(".json"), summary, "json")
            for path in files:
                Path(path).unlink(missing_ok=True)
                Path(path).with_suffix(".json").unlink(missing_ok=True)
        dist.barrier()
        return json.loads(out.with_suffix(".json").read_text())
    finally:
        dist.destroy_process_group()


def _sample(req: SampleRequest, progress: bool = True) -> dict:
    """:func:`run_sampling` in this process."""
    from tokencache.cache import get_method, reference_method

    if req.method is None:
        req.method = reference_method()
    if req.num_samples < 1 or req.batch_size < 1 or req.start_index < 0:
        raise ValueError("--num-samples and --batch-size must be ≥ 1 and --start-index ≥ 0")
    get_method(req.method, **req.method_params)  # bad method/parameter: fail before loading anything
    parse_sampler(req.sampler)
    device = resolve_device(req.device)
    model = build_model(req.checkpoint, req.model, req.overrides).to(device)
    check_output_file(req.out, sample_file_bytes(req.num_samples, image_side(model)))  # full disk: say so now
    vae = load_vae(req.vae, device) if model.in_channels == 4 else None
    images, labels, summary = generate_images(model, vae, req, progress)
    save_samples_npz(req.out, images, labels)
    summary.update(request=asdict(req), model_config=model.config, checkpoint_sha256=sha256_of(req.checkpoint),
                   device=str(device), torch=torch.__version__, provenance=provenance(str(device)))
    write_json_atomic(Path(req.out).with_suffix(".json"), summary)
    return summary


def generate_images(model, vae, req: SampleRequest, progress: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """(uint8 images, labels, summary) of samples ``req.start_index …`` with ``req``'s method and sampler.

    The model (and VAE) are built by the caller, so a caller sampling many settings of one model
    (``tokencache tune``) builds them once. The summary holds ``num_samples``, ``seconds``,
    ``sampler``, ``steps`` and the engine's ``cache`` record of the whole run.
    """
    from tokencache.cache import attach, get_method

    method = get_method(req.method, **req.method_params)
    images, labels, summaries = [], [], []
    start = time.perf_counter()
    indices = range(req.start_index, req.start_index + req.num_samples)
    with attach(model, method, req.sampler) as engine:
        sampler = engine.sampler
        diffusion = sampler.diffusion()
        bar = tqdm(total=req.num_samples, desc=f"sample {req.method} {sampler.name}", unit="img", disable=not progress)
        for lo in range(0, req.num_samples, req.batch_size):
            batch = list(indices[lo: lo + req.batch_size])
            gens = sample_generators(req.seed, batch)
            y = draw_labels(gens, model.num_classes)
            x = generate(model, sampler, y, gens, cfg_scale=req.cfg_scale, scale_pow=req.scale_pow,
                         diffusion=diffusion, clip_denoised=req.clip_denoised, step_listener=engine.step_listener)
            if not torch.isfinite(x).all():
                raise RuntimeError(f"non-finite values in samples {batch[0]}…{batch[-1]} ({req.method}): not saved")
            if vae is not None:
                x = decode_latents(vae, x)
            images.append(images_to_uint8(x, model.config["family"]))
            labels.append(y.numpy())
            summaries.append((len(batch), engine.summary(counts=True)))
            bar.update(len(batch))
        bar.close()
    seconds = time.perf_counter() - start
    summary = {"num_samples": req.num_samples, "seconds": round(seconds, 2), "sampler": sampler.name,
               "steps": sampler.steps, "cache": combine_cache_summaries(summaries)}
    return np.concatenate(images), np.concatenate(labels), summary


#: per-row arrays of an engine summary that a whole run averages over its samples
PER_ROW_ARRAYS = ("blocks_run", "branch_rows")


def combine_cache_summaries(parts: list[tuple[int, dict]]) -> dict:
    """One engine summary for a whole run from the per-batch summaries.

    Fractions and decisions are the last batch's (methods that decide per step and block decide
    the same for every batch); ``counts_per_sample`` (steps × blocks × [attn, mlp]) is the exact
    mean over all samples of the tokens computed per model row, weighting each batch by its
    size, and so are ``blocks_run`` and ``branch_rows`` (which runtime-signal methods, deciding
    per sample, change from batch to batch).
    """
    total = sum(n for n, _ in parts)
    merged = dict(parts[-1][1])
    counts = sum(np.asarray(p.pop("counts"), dtype=np.float64) * n for n, p in parts) / total
    merged.pop("counts", None)
    merged["counts_per_sample"] = counts.tolist()
    for key in PER_ROW_ARRAYS:  # per-row decisions (runtime signals) differ between batches
        if all(key in p for _, p in parts):
            merged[key] = (sum(np.asarray(p[key], dtype=np.float64) * n for n, p in parts) / total).tolist()
    return merged


def write_json_atomic(path: Path, obj: dict) -> None:
    """JSON through :func:`tokencache.io.write_atomic` (kept for callers of this name)."""
    write_atomic(path, obj, format="json")


def image_side(model) -> int:
    """Side in pixels of the images a model's samples decode to (latent models: the VAE's 8×)."""
    return int(model.input_size) * (8 if model.in_channels == 4 else 1)


def merge_shards(paths: list[str], out: str) -> dict:
    """Concatenate sampling shards (npz + their JSON) in sample-index order into one npz.

    Refuses gaps, overlaps and shards of different runs (model, sampler, seed, method), so a
    merged file is always exactly samples start…end of one run.
    """
    from tokencache.data.npz import load_samples_npz

    shards = []
    for path in paths:
        meta_path = Path(path).with_suffix(".json")
        if not meta_path.is_file():
            raise FileNotFoundError(f"shard {path} has no {meta_path.name}: it was not finished; rerun it")
        shards.append((json.loads(meta_path.read_text()), path))
    shards.sort(key=lambda item: item[0]["request"]["start_index"])
    per_shard = ("start_index", "num_samples", "out", "batch_size", "device")  # none changes a sample
    identity = {k: v for k, v in shards[0][0]["request"].items() if k not in per_shard}
    expected = shards[0][0]["request"]["start_index"]
    images, labels = [], []
    for meta, path in shards:
        req = meta["request"]
        if {k: v for k, v in req.items() if k not in per_shard} != identity:
            raise ValueError(f"shard {path} belongs to another run than {shards[0][1]}")
        if req["start_index"] != expected:
            raise ValueError(f"shards leave a gap or overlap at sample {expected} (next shard starts at {req['start_index']})")
        expected += req["num_samples"]
        arrays = load_samples_npz(path)
        images.append(arrays[0])
        labels.append(arrays[1])
    save_samples_npz(out, np.concatenate(images), np.concatenate(labels))
    sizes = [m["num_samples"] for m, _ in shards]
    cache = dict(shards[-1][0]["cache"])
    cache["counts_per_sample"] = (sum(np.asarray(m["cache"]["counts_per_sample"]) * n for (m, _), n in
                                      zip(shards, sizes)) / sum(sizes)).tolist()
    for key in PER_ROW_ARRAYS:
        if all(key in m["cache"] for m, _ in shards):
            cache[key] = (sum(np.asarray(m["cache"][key], dtype=np.float64) * n for (m, _), n in
                              zip(shards, sizes)) / sum(sizes)).tolist()
    shard_provenance = [m.get("provenance") or {} for m, _ in shards]
    merged_provenance = dict(shard_provenance[0])
    differ = sorted({k for p in shard_provenance[1:] for k in set(p) | set(merged_provenance)
                     if k != "load_average_1min" and p.get(k) != merged_provenance.get(k)})
    if differ:  # shards sampled on different machines or software: keep each one's record
        merged_provenance.update(differs_between_shards=differ, shards=shard_provenance)
    return {"num_samples": int(sum(len(x) for x in labels)), "shards": len(shards), "cache": cache,
            "seconds": round(sum(m["seconds"] for m, _ in shards), 2), "request": identity,
            "model_config": shards[0][0]["model_config"], "checkpoint_sha256": shards[0][0]["checkpoint_sha256"],
            "sampler": shards[0][0].get("sampler"), "steps": shards[0][0]["steps"],
            "device": shards[0][0].get("device"), "torch": shards[0][0].get("torch"),
            "provenance": merged_provenance}
