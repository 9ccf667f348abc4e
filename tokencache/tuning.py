"""Tuning a caching method: every point of its search space, scored on tuning seeds.

A method's standing in a comparison should not depend on which strengths someone picked. So each
method declares a finite search space (``CacheMethod.search_space``), and ``tokencache tune``
samples every point of it on a *tuning* seed — never the evaluation seed, never a calibration
seed — on a few samples, and scores each point by two numbers that need no reference batch:

* ``macs_speedup``: the uncached sampler's MACs over the point's (engine counts, CFG rows
  included; ``macs_speedup_with_overhead`` also prices the method's own scores and signals);
* ``psnr_to_full``: the mean PSNR of each image to the uncached model's image of the same
  (tuning seed, index), with its bootstrap 95% interval over the tuning images.

:func:`pareto_front` keeps the points no other point of the same method beats on both; only
those are then sampled on the evaluation seed with every metric. The selection reads nothing
but these files, so an evaluation-seed image can never move it.

The tuning record is deterministic (same inputs, same bytes); its seconds and machine go to a
``.provenance.json`` beside it.
"""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

#: the two objectives of a tuning point, both larger-is-better
OBJECTIVES = ("macs_speedup", "psnr_to_full")
#: bootstrap of a point's PSNR interval over the tuning images (a fixed seed: the same images, the same interval)
PSNR_RESAMPLES, PSNR_BOOTSTRAP_SEED = 1000, 0
#: the request fields a tuning run and its uncached reference must share (everything that moves an image)
SHARED_REQUEST = ("seed", "start_index", "num_samples", "sampler", "cfg_scale", "scale_pow", "clip_denoised", "vae")


def tuning_points(name: str, fixed: dict) -> list[dict]:
    """The points of method ``name``'s search space, the knobs ``fixed`` (given in the spec) left out.

    A knob given in the method spec is held at that value, so ``toca:interval=3`` tunes only
    ToCa's fresh ratio; the remaining points are the distinct combinations of the other knobs,
    in the space's order. A method without a search space (or every knob fixed) has one point:
    its configured setting.
    """
    from tokencache.cache import search_points

    points = []
    for point in search_points(name):
        free = {k: v for k, v in point.items() if k not in fixed}
        if free not in points:
            points.append(free)
    return points or [{}]


#: between a tuned point's family and its knobs in the run label
POINT_SEPARATOR = "@"


def point_label(family: str, point: dict) -> str:
    """``FAMILY@k=v,…``: the run label of a tuned point (the workflow's run folder name)."""
    knobs = ",".join(f"{k}={v}" for k, v in point.items())  # as a method spec writes them: parsed back alike
    return f"{family}{POINT_SEPARATOR}{knobs or 'configured'}"


def split_label(label: str) -> tuple:
    """(family, knobs) of a tuned point's run label; (None, None) for any other label (a hand-picked run)."""
    family, separator, knobs = label.partition(POINT_SEPARATOR)
    return (family, knobs) if separator else (None, None)


def psnr_interval(per_image: np.ndarray) -> list[float]:
    """Bootstrap 95% interval of the mean PSNR over the tuning images."""
    from tokencache.metrics.bootstrap import percentile_interval, resample_indices

    indices = resample_indices(len(per_image), PSNR_RESAMPLES, PSNR_BOOTSTRAP_SEED)
    return percentile_interval(per_image[indices].mean(axis=1))


def check_reference(reference_json: dict, request: dict, checkpoint_sha256: str, reference_path) -> None:
    """The uncached reference shares every setting that moves an image; else one line saying which."""
    from tokencache.cache import reference_method

    if reference_json.get("checkpoint_sha256") != checkpoint_sha256:
        raise ValueError(f"--reference {reference_path} was sampled from another checkpoint: sample the uncached "
                         "model of this checkpoint with the same seed and sampler")
    if reference_json.get("request", {}).get("method") != reference_method():
        raise ValueError(f"--reference {reference_path} is not an uncached run (method "
                         f"{reference_json.get('request', {}).get('method')!r})")
    for key in SHARED_REQUEST:
        theirs, ours = reference_json.get("request", {}).get(key), request[key]
        if theirs != ours:
            raise ValueError(f"--reference {reference_path} has {key} = {theirs!r}, this tuning {ours!r}: sample "
                             "the reference with the same seed, sample count, sampler and guidance")


def tune(request, reference: str, family: str, progress: bool = True) -> tuple[dict, dict]:
    """(record, provenance) of tuning ``request.method`` over its search space.

    ``request`` is a :class:`tokencache.run.SampleRequest` on the tuning seed (its method params
    are the base setting, knobs held fixed); ``reference`` the uncached run's npz of the same
    request (its ``.json`` beside it). The model is built once and every point sampled in turn.
    """
    import json

    from tokencache.cache import get_method
    from tokencache.cache.registry import method_spec
    from tokencache.data.npz import load_samples_npz
    from tokencache.metrics.fidelity import identical, psnr, ssim
    from tokencache.metrics.flops import cfg_rows_per_image, sampling_macs
    from tokencache.models.checkpoints import sha256_of
    from tokencache.models.vae import load_vae
    from tokencache.provenance import provenance
    from tokencache.run import build_model, generate_images, resolve_device
    from tokencache.sampling import parse_sampler

    get_method(request.method, **request.method_params)  # a bad base setting fails before any sampling
    parse_sampler(request.sampler)
    reference_json = json.loads(Path(reference).with_suffix(".json").read_text())
    checkpoint_sha256 = sha256_of(request.checkpoint)
    check_reference(reference_json, asdict(request), checkpoint_sha256, reference)
    full_images, full_labels = load_samples_npz(reference)[:2]

    device = resolve_device(request.device)
    model = build_model(request.checkpoint, request.model, request.overrides).to(device)
    points, skipped = runnable_points(model, request, family)
    vae = load_vae(request.vae, device) if model.in_channels == 4 else None
    cfg = cfg_rows_per_image(model.config["family"], request.cfg_scale) == 2
    file_param = getattr(type(get_method(request.method, **request.method_params)).calibration, "file_param", None)
    base = {k: v for k, v in request.method_params.items() if k != file_param}
    scored, seconds = [], []
    for i, point in enumerate(points):
        if progress:
            print(f"tune {family}: point {i + 1}/{len(points)} {point_label(family, point)}", flush=True)
        run = replace(request, method_params={**request.method_params, **point})
        images, labels, summary = generate_images(model, vae, run, progress)
        if not np.array_equal(labels, full_labels):
            raise ValueError(f"--reference {reference}: labels differ from the tuning run's: not the same samples")
        macs = sampling_macs(model, summary["cache"], cfg=cfg)
        per_image = psnr(images, full_images, per_image=True)
        scored.append({
            "label": point_label(family, point), "params": point,
            "spec": method_spec(request.method, {**base, **point}),
            "macs_speedup": macs["macs_speedup"], "macs_speedup_with_overhead": macs["macs_speedup_with_overhead"],
            "psnr_to_full": float(per_image.mean()), "psnr_to_full_ci95": psnr_interval(per_image),
            "ssim_to_full": ssim(images, full_images), "identical_to_full": identical(images, full_images),
        })
        seconds.append({"label": scored[-1]["label"], "seconds": summary["seconds"]})
    mark_front(scored)
    record = {"family": family, "method": request.method, "base": base, "model": model.config["name"],
              "sampler": request.sampler, "seed": request.seed, "start_index": request.start_index,
              "num_samples": request.num_samples, "checkpoint_sha256": checkpoint_sha256,
              "objectives": list(OBJECTIVES), "points": scored, **({"skipped": skipped} if skipped else {})}
    volatile = {"seconds": seconds, "request": asdict(request), "reference": str(reference),
                "provenance": provenance(str(device))}
    return record, volatile


def runnable_points(model, request, family: str) -> tuple[list[dict], list[dict]]:
    """(points, skipped): the search space's points this model and sampler can run, and the others
    with the method's reason (fewer steps than the sampler allows, more shallow blocks than the model
    has). A method plans when it is attached, so each point is attached once, before any sampling."""
    from tokencache.cache import attach

    points, skipped = [], []
    for point in tuning_points(request.method, request.method_params):
        try:
            with attach(model, request.method, request.sampler, **{**request.method_params, **point}):
                pass
            points.append(point)
        except ValueError as exc:
            skipped.append({"label": point_label(family, point), "reason": str(exc)})
    return points, skipped


def pareto_front(scores: list[tuple[float, float]]) -> list[bool]:
    """Whether each (speed-up, quality) pair is non-dominated: no other pair is at least as good
    in both and better in one. Equal pairs are all kept (neither beats the other)."""
    out = []
    for i, (s, q) in enumerate(scores):
        beaten = any((s2 >= s and q2 >= q) and (s2 > s or q2 > q) for j, (s2, q2) in enumerate(scores) if j != i)
        out.append(not beaten)
    return out


def mark_front(points: list[dict]) -> None:
    """Set each scored point's ``front`` (non-dominated) and ``same_as``.

    Points with equal scores are almost always one computation reached by knobs that do not act
    in that setting (e.g. a ratio v2 derives itself): the first in search-space order stands for
    them, the others get ``same_as`` its label and stay off the front, so no run is evaluated twice.
    """
    first = {}
    for point in points:
        key = (point["macs_speedup"], point["psnr_to_full"], point["ssim_to_full"])
        point["same_as"] = first.get(key)
        first.setdefault(key, point["label"])
    distinct = [p for p in points if p["same_as"] is None]
    on_front = pareto_front([(p["macs_speedup"], p["psnr_to_full"]) for p in distinct])
    flags = {id(p): bool(f) for p, f in zip(distinct, on_front)}
    for point in points:
        point["front"] = flags.get(id(point), False)


#: which front points are evaluated on the evaluation seed (``tuning.evaluate`` of the workflow)
EVALUATE_CHOICES = ("front", "budgets")


def evaluated_points(points: list[dict], evaluate: str, budgets) -> list[str]:
    """Labels of a family's front points to evaluate.

    ``front``: every non-dominated point. ``budgets``: only the ones a budget table can pick, as
    judged on the tuning seed: for each MACs speed-up budget, the front point with the best PSNR
    at or above it. The choice still reads nothing but the tuning scores.
    """
    if evaluate not in EVALUATE_CHOICES:
        raise ValueError(f"tuning.evaluate: {evaluate!r} is not one of {', '.join(EVALUATE_CHOICES)}")
    front = [p for p in points if p["front"]]
    if evaluate == "front":
        return [p["label"] for p in front]
    chosen = set()
    for budget in budgets:
        fast = [p for p in front if p["macs_speedup"] >= budget]
        if fast:
            chosen.add(max(fast, key=lambda p: p["psnr_to_full"])["label"])
    return [p["label"] for p in front if p["label"] in chosen]


def front_record(records: list[dict], evaluate: str = "front", budgets=()) -> dict:
    """One (model, sampler)'s front file from its families' tuning records: every point, with
    ``front`` (non-dominated on the tuning seed) and ``evaluate`` (sampled and evaluated on the
    evaluation seed, :func:`evaluated_points`). Families keep their records' order (the config's)."""
    if not records:
        raise ValueError("no tuning records to select from")
    first = records[0]
    shared = ("model", "sampler", "seed", "start_index", "num_samples", "checkpoint_sha256")
    for record in records[1:]:
        for key in shared:
            if record[key] != first[key]:
                raise ValueError(f"tuning records of {first['family']} and {record['family']} differ in {key} "
                                 f"({first[key]!r} vs {record[key]!r}): tune them on the same seed and model")
    methods = {}
    for record in records:
        points = [dict(p) for p in record["points"]]
        mark_front(points)  # from the scores alone, whichever tokencache wrote the record
        chosen = evaluated_points(points, evaluate, budgets)
        points = [{**p, "evaluate": p["label"] in chosen} for p in points]
        methods[record["family"]] = {"method": record["method"], "base": record["base"], "points": points}
    return {**{k: first[k] for k in shared}, "objectives": list(OBJECTIVES),
            "selection": {"evaluate": evaluate, "budgets": list(budgets)},
            "methods": methods}


def front_labels(front: dict) -> list[str]:
    """Labels of the points a front file marks for evaluation, in file order."""
    return [p["label"] for family in front["methods"].values() for p in family["points"] if p["evaluate"]]
