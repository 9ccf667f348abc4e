"""The ``tokencache`` command line: thin parsing around the library.

Every subcommand has ``--help``; long work shows a progress bar; ``--json`` prints a
machine-readable result; a mistake in the input or the environment (a bad argument, a file
that is not what it should be, an output folder that cannot be written, a full disk) ends with
one line ``tokencache: error: …`` naming the fix (exit 2) instead of a traceback, and is caught
before the long work where it can be. Compute commands take ``--threads`` (default: the CPUs
available to the process that are idle when it starts).
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
from pathlib import Path

# OpenMP threads that wait for work sleep instead of spinning: with spinning, a second process on
# one of the cores made torch 5-25x slower here (each parallel region waits for the descheduled
# thread); sleeping costs nothing measurable on an idle machine. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import tokencache  # noqa: E402,F401  (makes torchvision importable beside CPU torch)
from tokencache._allocator import keep_freed_memory  # noqa: E402
from tokencache.errors import UserError  # noqa: E402

#: Errors that mean "the user asked for something wrong or missing": printed as one line.
#: Set TOKENCACHE_DEBUG=1 to see the traceback instead. OSError (permissions, full disk, …)
#: is printed as one line too, naming the file. Not RuntimeError: from the engine, a method or
#: torch it is a bug, and its traceback is printed (a RuntimeError that is the user's to fix
#: is a UserError: a missing CUDA device, a plugin, a download, tokencache/errors.py).
USER_ERRORS = (UserError, ValueError, FileNotFoundError)

#: subcommands that compute with torch: they take --threads
COMPUTE_COMMANDS = {"train-backbone", "sample", "tune", "calibrate", "train-evaluator",
                    "reference", "reference-features", "evaluate", "flops", "latency", "standins"}


def parse_overrides(items: list[str]) -> dict:
    """``["hidden_size=64", "learn_sigma=false"]`` → {"hidden_size": 64, "learn_sigma": False}."""
    from tokencache.models.registry import parse_override_value

    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"expected key=value, got {item!r}")
        key, raw = item.split("=", 1)
        out[key.strip()] = parse_override_value(raw.strip())
    return out


def _emit(result: dict, as_json: bool, human: str) -> None:
    print(json.dumps(result, indent=2) if as_json else human)


# --------------------------------------------------------------------------- subcommands


def cmd_models(args) -> None:
    from tokencache.models.registry import FAMILIES, PRESETS

    rows = {name: {"family": fam, **kw} for name, (fam, kw) in PRESETS.items()}
    if args.json:
        print(json.dumps({"presets": rows, "families": list(FAMILIES)}, indent=2))
        return
    print(f"{'preset':<14} {'family':<6} depth hidden heads patch  extra")
    for name, row in rows.items():
        extra = {k: v for k, v in row.items() if k not in ("family", "depth", "hidden_size", "num_heads", "patch_size")}
        print(f"{name:<14} {row['family']:<6} {row['depth']:>5} {row['hidden_size']:>6} {row['num_heads']:>5} "
              f"{row['patch_size']:>5}  {extra or ''}")
    print(f"families (all keywords explicit): {', '.join(FAMILIES)}")


def cmd_download(args) -> None:
    from tokencache.models.checkpoints import OFFICIAL_WEIGHTS, download_official

    names = list(OFFICIAL_WEIGHTS) if args.name == "all" else [args.name]
    for name in names:
        path = download_official(name, args.dir, progress=not args.quiet, base_url=args.base_url)
        print(path)


def cmd_standins(args) -> None:
    from tokencache.standins import build_standins, parse_model_sets

    manifest = build_standins(args.out_dir, seed=args.seed, model_sets=parse_model_sets(args.model_set),
                              reference_count=args.reference_images)
    _emit({"out_dir": str(args.out_dir), **manifest}, args.json,
          f"wrote {len(manifest['files'])} stand-ins and manifest.json to {args.out_dir} (seed {args.seed}); "
          f"serve them with a mirror (docs/paper-scale.md)")


def cmd_train_backbone(args) -> None:
    from tokencache.train import TESTBED_RECIPES, TrainConfig, train_backbone

    recipe = {**TESTBED_RECIPES.get(args.model, TESTBED_RECIPES["DiT-digits"]),
              **{k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size), ("lr", args.lr)) if v is not None}}
    cfg = TrainConfig(model=args.model, overrides=parse_overrides(args.model_set), seed=args.seed, threads=args.threads,
                      loss_weighting=args.loss_weighting, grad_clip=args.grad_clip, **recipe)
    from tokencache.checks import check_output_file
    from tokencache.train import check_config

    check_config(cfg)  # unknown model or keyword, bad numbers: fail before any file is written
    check_output_file(args.out, needed_bytes=64 << 20)
    with buffered_log(Path(args.out).with_suffix(".log.jsonl")) as log:
        summary = train_backbone(cfg, args.out, progress=not args.quiet, log=log, ema_only=args.ema_only)
    _emit({"checkpoint": str(args.out), **summary}, args.json,
          f"wrote {args.out}: {summary['steps']} steps in {summary['seconds']} s, final loss {summary['final_loss']:.4f}")


def cmd_sample(args) -> None:
    from tokencache.cache import parse_method_spec, reference_method
    from tokencache.checks import check_output_file
    from tokencache.run import SampleRequest, run_sampling

    method, method_params = parse_method_spec(args.method or reference_method())
    check_output_file(args.out)  # a folder, a read-only place: say so before loading the model
    request = SampleRequest(
        model=args.model, checkpoint=args.checkpoint, overrides=parse_overrides(args.model_set),
        sampler=args.sampler, cfg_scale=args.cfg_scale, scale_pow=args.scale_pow, num_samples=args.num_samples,
        batch_size=args.batch_size, seed=args.seed, start_index=args.start_index, out=args.out, vae=args.vae,
        device=args.device, clip_denoised=args.clip_denoised, method=method, method_params=method_params,
    )
    summary = run_sampling(request, progress=not args.quiet)
    _emit(summary, args.json, f"wrote {summary['num_samples']} samples to {args.out} in {summary['seconds']} s")


def cmd_tune(args) -> None:
    """Every point of a method's search space on tuning seeds: MACs speed-up and PSNR to full."""
    from tokencache.cache import parse_method_spec
    from tokencache.checks import check_output_file
    from tokencache.io import write_atomic
    from tokencache.run import SampleRequest
    from tokencache.tuning import tune

    method, method_params = parse_method_spec(args.method)
    check_output_file(args.out)
    if not Path(args.reference).is_file() or not Path(args.reference).with_suffix(".json").is_file():
        raise FileNotFoundError(f"--reference {args.reference} (and its .json) not found: sample the uncached model "
                                f"first, e.g. tokencache sample --seed {args.seed} --num-samples {args.num_samples} "
                                f"--sampler {args.sampler} --out {args.reference}")
    request = SampleRequest(
        model=args.model, checkpoint=args.checkpoint, overrides=parse_overrides(args.model_set),
        sampler=args.sampler, cfg_scale=args.cfg_scale, scale_pow=args.scale_pow, num_samples=args.num_samples,
        batch_size=args.batch_size, seed=args.seed, out=args.out, vae=args.vae, device=args.device,
        clip_denoised=args.clip_denoised, method=method, method_params=method_params,
    )
    record, volatile = tune(request, args.reference, args.label or method, progress=not args.quiet)
    write_atomic(args.out, record, format="json")
    write_atomic(Path(args.out).with_suffix(".provenance.json"), volatile, format="json")
    front = [p for p in record["points"] if p["front"]]
    _emit(record, args.json, f"wrote {args.out}: {len(record['points'])} points of {record['family']}, "
                             f"{len(front)} on its front")


def cmd_methods(args) -> None:
    from tokencache.cache import describe_methods

    methods = describe_methods()
    if args.json:
        print(json.dumps(methods, indent=2))
        return
    for m in methods:
        flags = [m["role"]] + (["host sync"] if m["host_sync"] else [])
        print(f"{m['name']} ({', '.join(flags)}): {m['doc']}")
        for p in m["params"]:
            bounds = f" [{p['range']}]" if p.get("range") else ""
            print(f"    {p['name']} ({p['type']}, default {p['default']}){bounds}: {p['doc']}")
        if m["search_space"]:
            knobs = "; ".join(f"{k} ∈ {v}" for k, v in m["search_space"]["knobs"].items())
            print(f"    search space ({m['search_space']['points']} points): {knobs}")
        if m["calibration"]:
            cal = m["calibration"]
            print(f"    calibration: {cal['title']} → {cal['file_parameter']}= (tokencache calibrate --method "
                  f"{m['name']} --settings …)")
            for p in cal["settings"]:
                print(f"        {p['name']} ({p['type']}, default {p['default']}): {p['doc']}")


def cmd_calibrate(args) -> None:
    """Fit a method's calibration (router, predictor, coefficients) against the frozen model."""
    from tokencache.cache import SamplingSettings, calibrate, get_method, parse_method_spec
    from tokencache.cache.methods import parse_typed
    from tokencache.checks import check_output_file
    from tokencache.run import build_model

    name, params = parse_method_spec(args.method)
    method = get_method(name, **params)
    calibration = type(method).calibration
    if calibration is None:
        raise ValueError(f"{name} has nothing to calibrate (methods with a calibration: see `tokencache methods`)")
    settings = {}
    for item in args.settings:
        if "=" not in item:
            raise ValueError(f"--settings: expected key=value, got {item!r}")
        key, raw = item.split("=", 1)
        settings[key.strip()] = parse_typed(calibration, f"{name} calibration", key.strip(), raw)
    settings = calibration(**settings)
    check_output_file(args.out)
    model = build_model(args.checkpoint, args.model, parse_overrides(args.model_set))
    sampling = SamplingSettings(cfg_scale=args.cfg_scale, scale_pow=args.scale_pow, clip_denoised=args.clip_denoised)
    with buffered_log(Path(args.out).with_suffix(".log.jsonl")) as log:
        summary = calibrate(method, model, args.sampler, settings, sampling, out=args.out, progress=not args.quiet,
                            log=log)
    _emit(summary, args.json, f"wrote {args.out} ({calibration.title} for {summary['variant']}, {summary['sampler']})")


def cmd_flops(args) -> None:
    from tokencache.metrics.flops import forward_cost, run_macs

    if args.run:
        result = run_macs(args.run)
        _emit(result, args.json, f"{result['macs_per_image'] / 1e9:.4g} GMACs per image (CFG included), "
                                 f"{result['macs_speedup']:.3f}× fewer than the full run")
        return
    if not args.model:
        raise ValueError("give --model PRESET (forward MACs) or --run samples.json (MACs of a sampling run)")
    result = forward_cost(args.model, batch_size=args.batch_size, count_with_fvcore=not args.analytic_only,
                          **parse_overrides(args.model_set))
    if result.get("match") is False:
        raise RuntimeError(f"fvcore and the analytic formula disagree for {args.model}: "
                           f"{result['fvcore']['total']} vs {result['analytic_macs']}")
    _emit(result, args.json, f"{args.model}: {result['analytic_macs'] / 1e9:.4f} GMACs per forward "
                             f"(batch {args.batch_size}, no CFG)"
                             + ("" if args.analytic_only else ", fvcore agrees"))


def cmd_latency(args) -> None:
    from tqdm import tqdm

    from tokencache.metrics.latency import DTYPES, measure_latency, random_calibration, write_latency_table
    from tokencache.models.registry import create_model
    from tokencache.run import build_model, resolve_device

    from tokencache.cache import available_methods, method_class, parse_labelled_spec, reference_method

    methods = []
    for spec in args.method:
        if spec == "all":  # every registered method at its defaults, the reference first
            names = sorted(available_methods(), key=lambda name: name != reference_method())
            methods += [(name, name, {}) for name in names if name not in {m[0] for m in methods}]
        else:
            methods.append(parse_labelled_spec(spec))
    if not any(method_class(name).role == "reference" for _, name, _ in methods):
        reference = reference_method()
        methods.insert(0, (reference, reference, {}))
    overrides = parse_overrides(args.model_set)
    device = resolve_device(args.device)
    if args.checkpoint:
        model = build_model(args.checkpoint, args.model, overrides)
    elif args.model:
        model = create_model(args.model, **overrides).eval().requires_grad_(False)
    else:
        raise ValueError("give --checkpoint, or --model PRESET to time random weights (cost does not depend on them)")
    model = model.to(device)
    if args.cast_weights:
        if args.dtype in (None, "float32"):
            raise ValueError("--cast-weights needs --dtype bfloat16 or float16")
        model = model.to(DTYPES[args.dtype])
    notes = {}
    if args.random_calibration:  # after the cast: the files carry the weights' checksum
        methods, notes = random_calibration(methods, model, args.sampler, args.random_calibration, seed=args.seed)
    vae = None
    if args.vae and model.in_channels == 4:
        from tokencache.models.vae import load_vae

        vae = load_vae(args.vae, device)
    total = (args.warmup + args.repeats) * len(args.batch_sizes) * len(methods)
    machine = machine_load_before(device, args.threads)
    with tqdm(total=total, desc="latency", disable=args.quiet) as bar:
        rows = measure_latency(model, methods, sampler=args.sampler, batch_sizes=args.batch_sizes,
                               cfg_scale=args.cfg_scale, repeats=args.repeats, warmup=args.warmup, device=str(device),
                               dtype=args.dtype, vae=vae, seed=args.seed, scale_pow=args.scale_pow, tf32=args.tf32,
                               compile_mode=args.compile, compile_backend=args.compile_backend, notes=notes,
                               decision_timing=args.decision_timing, on_run=lambda *a, **k: bar.update(1))
    if rows[0]["provenance"].get("graphs_compiled_while_timing"):
        print("tokencache: warning: graphs were compiled during the timed rounds; raise --warmup", file=sys.stderr)
    machine = machine_load_after(machine, rows)
    write_latency_table(rows, args.csv, args.md)
    if args.out:
        from tokencache.io import write_atomic

        write_atomic(Path(args.out), {"rows": rows, "machine": machine})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['label']:<16} batch {r['batch_size']:>4}: {r['sampling_s']['median']:.3f} s, "
                  f"speed-up {r['speedup']:.2f}×, MACs {r['macs_speedup']:.2f}×, realization {r['realization_ratio']:.2f}")


#: a latency row whose interquartile range exceeds this fraction of its median is flagged as noisy
NOISY_SPREAD = 0.25


def machine_load_before(device, threads: int) -> dict:
    """Load average and CPUs before timing; warns when other processes use the CPUs the timing needs.

    Busy: the 1-minute load average plus our threads exceed the available CPUs by more than half a CPU.
    """
    from tokencache.provenance import available_cpus, load_average, provenance

    cpus, load = available_cpus(), load_average()
    busy = load is not None and load + threads > cpus + 0.5
    if busy and str(device).startswith("cpu"):
        print(f"tokencache: warning: the machine is busy (1-minute load average {load:.2f} on {cpus} CPUs before "
              f"timing): CPU latencies will be slow and noisy; time on an idle machine", file=sys.stderr)
    return {"load_average_before": load, "cpus_available": cpus, "threads": threads, "busy_before": busy,
            "provenance": provenance(str(device))}


def machine_load_after(machine: dict, rows: list) -> dict:
    """Adds the load after timing and the noisy rows (IQR > 25% of the median); warns about them."""
    from tokencache.provenance import load_average

    noisy = [f"{r['label']} (batch {r['batch_size']})" for r in rows
             if r["sampling_s"]["median"] > 0 and r["sampling_s"]["iqr"] > NOISY_SPREAD * r["sampling_s"]["median"]]
    machine = {**machine, "load_average_after": load_average(), "noisy_rows": noisy,
               "noisy_spread": f"IQR > {NOISY_SPREAD:.0%} of the median"}
    if noisy:
        print(f"tokencache: warning: {len(noisy)} of {len(rows)} timings spread by more than {NOISY_SPREAD:.0%} of their "
              f"median ({', '.join(noisy[:3])}{' …' if len(noisy) > 3 else ''}): the machine was busy or --repeats "
              f"is too small; rerun on an idle machine", file=sys.stderr)
    return machine


def cmd_latency_report(args) -> None:
    from tokencache.metrics.latency_report import write_latency_report

    result = write_latency_report(args.runs, args.out_dir)
    _emit(result, args.json, f"wrote {result['csv']}, {result['md']} and {result['plot']} "
                             f"({result['rows']} rows, {result['configurations']} configurations)\n\n{result['short']}")


def cmd_merge(args) -> None:
    from tokencache.checks import check_output_file
    from tokencache.io import write_atomic
    from tokencache.run import merge_shards

    check_output_file(args.out)
    if any(Path(shard).resolve() == Path(args.out).resolve() for shard in args.shards):
        raise ValueError(f"--out {args.out} is one of the shards: merge into a new file")
    summary = merge_shards(args.shards, args.out)
    write_atomic(Path(args.out).with_suffix(".json"), summary)  # what `flops --run` and `sample` JSON readers take
    _emit(summary, args.json, f"merged {summary['shards']} shards, {summary['num_samples']} samples → {args.out}")


def cmd_train_evaluator(args) -> None:
    from tokencache.checks import check_output_file
    from tokencache.metrics.digits_evaluator import train_digits_evaluator

    check_output_file(args.out)
    net = train_digits_evaluator(args.out, seed=args.seed)
    _emit({"evaluator": str(args.out), **net.meta}, args.json,
          f"wrote {args.out}: held-out accuracy {net.meta['test_accuracy']:.4f}")


def cmd_reference(args) -> None:
    from tokencache.checks import check_output_file
    from tokencache.data.digits import digits_to_uint8, load_digits_dataset
    from tokencache.data.npz import load_samples_npz
    from tokencache.io import sha256_file
    from tokencache.metrics.reference import save_reference_batch

    check_output_file(args.out)
    if args.features == "digits" and args.weights is None:
        raise ValueError("--features digits needs --weights (the digits evaluator .pt of `tokencache train-evaluator`, "
                         "or `shipped`)")
    if args.images:
        images, _ = load_samples_npz(args.images)
        source = args.images
    else:
        images, source = digits_to_uint8(load_digits_dataset("test").images), "digits test split"
    save_reference_batch(args.out, images, extractor=args.features, weights_path=resolve_weights(args.weights),
                         progress=not args.quiet)
    result = {"reference": str(args.out), "images": source, "num_images": int(len(images)),
              "features": args.features, "sha256": sha256_file(args.out)}
    _emit(result, args.json, f"wrote {args.out}: {len(images)} images from {source} ({args.features} features)")


def cmd_reference_features(args) -> None:
    """The reference batch's image features, extracted once for every evaluation against it."""
    from tokencache.checks import check_output_file
    from tokencache.metrics.features import load_extractor
    from tokencache.metrics.reference import save_reference_features

    check_output_file(args.out)
    reference = resolve_reference(args.reference)
    extractor = load_extractor(args.features, resolve_weights(args.weights),
                               None if args.device == "auto" else args.device)
    info = save_reference_features(args.out, reference, extractor, batch_size=args.batch_size,
                                   progress=not args.quiet)
    result = {"out": str(args.out), "reference": str(reference), "features": args.features, **info}
    _emit(result, args.json, f"wrote {args.out}: {args.features} features of {info['images']} reference images")


def cmd_evaluate(args) -> None:
    from tokencache.checks import check_output_file
    from tokencache.io import write_atomic
    from tokencache.metrics.quality import evaluate_run

    if args.out:
        check_output_file(args.out)  # before the work: a missing folder is made, a read-only one named
    result = evaluate_run(args.samples, resolve_reference(args.reference), features=args.features,
                          weights_path=resolve_weights(args.weights), fidelity_to=args.fidelity_to,
                          batch_size=args.batch_size, device=None if args.device == "auto" else args.device,
                          progress=not args.quiet, bootstrap=args.bootstrap, bootstrap_seed=args.bootstrap_seed,
                          bootstrap_out=bootstrap_path(args.out) if args.out else None,
                          reference_features=args.reference_features)
    if args.out:
        write_atomic(Path(args.out), result)
    human = ", ".join(f"{k} {result[k]:.4g}" for k in ("fid", "sfid", "inception_score", "precision", "recall",
                                                        "class_consistency", "psnr_to_full", "ssim_to_full") if result.get(k) is not None)
    _emit(result, args.json, f"{result['num_samples']} samples: {human}")


def cmd_compare(args) -> None:
    """Whether two results folders agree, table by table (tokencache/compare.py); exit 1 when not."""
    from tokencache.compare import compare_results, summary_text

    if args.tolerance < 0 or args.rtol < 0:
        raise ValueError("--tolerance and --rtol must be ≥ 0")
    report = compare_results(args.results_a, args.results_b, tolerance=args.tolerance, rtol=args.rtol)
    _emit(report, args.json, summary_text(report))
    if not report["agree"]:
        raise SystemExit(1)


# --------------------------------------------------------------------------- parser


def add_sampling_arguments(p, num_samples: int) -> None:
    """The model, sampler, guidance, batch and device options of the commands that sample (sample, tune)."""
    p.add_argument("--model", default=None, help="preset or family; default: the one recorded in the checkpoint")
    p.add_argument("--model-set", nargs="*", default=[], metavar="KEY=VALUE", help="model constructor overrides")
    p.add_argument("--checkpoint", required=True, help="official .pt or a train-backbone checkpoint")
    p.add_argument("--sampler", default="ddim50", help="ddpm<N> or ddim<N> (default: ddim50)")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale (1: off)")
    p.add_argument("--scale-pow", type=float, default=4.0, help="MDT's power-cosine guidance exponent")
    p.add_argument("--num-samples", type=int, default=num_samples, help=f"samples (default: {num_samples})")
    p.add_argument("--batch-size", type=int, default=num_samples)
    p.add_argument("--clip-denoised", action="store_true", help="clamp predicted x0 to [-1, 1] (pixel models)")
    p.add_argument("--vae", default="ema", help="latent models: ema, mse, or a local AutoencoderKL folder")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="tokencache", description=__doc__.splitlines()[0] + " See README.md.")
    parser.add_argument("--version", action="version", version=f"tokencache {tokencache.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, fn, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", action="store_true", help="print the result as JSON")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--plugins", action="append", default=[], metavar="DIR",
                       help="also load the method plugins of this folder (repeatable; or $TOKENCACHE_PLUGINS)")
        if name in COMPUTE_COMMANDS:
            p.add_argument("--threads", type=int, default=None,
                           help="CPU threads of torch and of NumPy's BLAS (default: $OMP_NUM_THREADS if set, "
                                "else the CPUs available to this process that no other process is "
                                "using at the start)")
        p.set_defaults(fn=fn)
        return p

    add("models", cmd_models, "list model presets (DiT, MDT, MDTv2 and the digits testbed)")

    p = add("download", cmd_download, "download official checkpoints (needs internet)")
    p.add_argument("name", help="file name (DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt, mdt_xl2_v1_ckpt.pt, "
                               "mdt_xl2_v2_ckpt.pt) or 'all'")
    p.add_argument("--dir", default="checkpoints", help="target folder (default: checkpoints)")
    p.add_argument("--base-url", default=None, metavar="URL",
                   help="fetch URL/<file name> from a mirror and check it against URL/manifest.json "
                        "(default: $TOKENCACHE_MIRROR if set, else the official URLs)")

    p = add("standins", cmd_standins,
            "write stand-ins of the paper config's downloads (official formats, random weights from a seed; no network)")
    p.add_argument("out_dir", help="folder for the checkpoints, VAE, Inception weights, reference batch, manifest.json")
    p.add_argument("--seed", type=int, default=0, help="seed of every random value (default: 0; same seed, same bytes)")
    p.add_argument("--model-set", action="append", default=[], metavar="PRESET:KEY=VALUE[,KEY=VALUE]",
                   help="constructor overrides of a stand-in checkpoint, e.g. DiT-XL/2:hidden_size=32,num_heads=2 "
                        "(repeatable; default hidden_size=32,num_heads=2 for DiT-XL/2 and MDTv2-XL/2); load it "
                        "with the same overrides: tokencache sample --model-set hidden_size=32 num_heads=2")
    p.add_argument("--reference-images", type=int, default=16,
                   help="images of the stand-in reference batch (default: 16; ADM's has 10,000)")

    p = add("train-backbone", cmd_train_backbone, "train a digits testbed backbone (DiT or MDTv2) on the CPU")
    p.add_argument("--model", default="DiT-digits", help="preset or family (default: DiT-digits)")
    p.add_argument("--model-set", nargs="*", default=[], metavar="KEY=VALUE", help="model constructor overrides")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (default: the preset's testbed recipe, DiT-digits 1000, MDTv2-digits 600)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: the recipe's, 32)")
    p.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate (default: the recipe's, 1e-2)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 for none (default: 1)")
    p.add_argument("--loss-weighting", choices=["official", "min_snr"], default="min_snr",
                   help="official (DiT: uniform ε-MSE; MDTv2: min-SNR-5) or min_snr for both (default: min_snr, "
                        "which converges several times faster on the testbed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema-only", action="store_true",
                   help="write only the EMA weights and the model's settings (what sampling uses; a quarter of the size)")
    p.add_argument("--out", required=True, help="checkpoint path (.pt)")

    p = add("sample", cmd_sample, "sample images to an ADM-format npz (arr_0 uint8 NHWC, arr_1 labels)")
    add_sampling_arguments(p, num_samples=64)
    p.add_argument("--seed", type=int, default=0, help="run seed: sample i's label and noise depend on (seed, i)")
    p.add_argument("--start-index", type=int, default=0, help="first sample index (for shards)")
    p.add_argument("--method", default=None, metavar="NAME[:KEY=VALUE,…]",
                   help="caching method and its parameters, e.g. fora:interval=3 (see `tokencache methods`; "
                        "default: the uncached reference)")
    p.add_argument("--out", required=True, help="output .npz")

    p = add("tune", cmd_tune, "sample every point of a method's search space on tuning seeds and score it "
                              "(MACs speed-up, PSNR to the uncached images); mark its non-dominated points")
    p.add_argument("--method", required=True, metavar="NAME[:KEY=VALUE,…]",
                   help="the method and its fixed parameters (calibration files, knobs to hold), e.g. "
                        "toca or tokencache:predictor=FILE,version=2; the other knobs of its search space vary")
    p.add_argument("--reference", required=True,
                   help="the uncached model's npz on the same seed, count and sampler (`tokencache sample`)")
    p.add_argument("--label", default=None, help="the family name in the record and in run labels (default: the method)")
    add_sampling_arguments(p, num_samples=32)
    p.add_argument("--seed", type=int, required=True,
                   help="the tuning seed: keep it apart from the evaluation and calibration seeds")
    p.add_argument("--out", required=True, help="the tuning record (.json; its seconds go to .provenance.json)")

    add("methods", cmd_methods, "list the caching methods (built in, plugin folders, entry points) with their parameters")

    p = add("calibrate", cmd_calibrate,
            "fit a method's trained part (L2C router, TokenCache predictor, …) against the frozen model")
    p.add_argument("--method", required=True, metavar="NAME[:KEY=VALUE,…]",
                   help="the method (and variant) to calibrate, e.g. l2c or tokencache")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--model-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="model constructor overrides on top of the checkpoint's architecture (as in `sample`)")
    p.add_argument("--model", default=None, help="preset; default: recorded in the checkpoint")
    p.add_argument("--sampler", default="ddim50", help="the sampler the runs will use (the file is tied to it)")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--scale-pow", type=float, default=None, help="MDT's guidance exponent")
    p.add_argument("--clip-denoised", action="store_true")
    p.add_argument("--settings", nargs="*", default=[], metavar="KEY=VALUE",
                   help="training settings (steps, lr, seed, …; `tokencache methods` lists each method's)")
    p.add_argument("--out", required=True, help="calibration file (.pt); the loss log goes beside it (.log.jsonl)")

    p = add("train-evaluator", cmd_train_evaluator, "train the digits CNN that plays Inception's role on the testbed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="evaluator checkpoint (.pt)")

    p = add("reference", cmd_reference, "write an ADM-style reference batch (mu, sigma, mu_s, sigma_s, arr_0)")
    p.add_argument("--images", default=None, help="images npz (arr_0 uint8 NHWC); default: the digits test split")
    p.add_argument("--features", choices=["inception", "digits"], default="digits")
    p.add_argument("--weights", default=None, help="Inception weights file, or the digits evaluator .pt "
                                                   "(`shipped`: the one that ships with tokencache)")
    p.add_argument("--out", required=True, help="reference .npz")

    p = add("evaluate", cmd_evaluate, "FID, sFID, IS, precision/recall (ADM definitions) of a sample npz")
    p.add_argument("samples", help="sample .npz (arr_0 uint8 NHWC, arr_1 labels)")
    p.add_argument("--reference", required=True, help="ADM reference batch .npz (e.g. VIRTUAL_imagenet256_labeled.npz; "
                                                      "`shipped`: the digits testbed's)")
    p.add_argument("--features", choices=["inception", "digits"], default="inception")
    p.add_argument("--weights", default=None, help="Inception weights file (offline) or the digits evaluator .pt "
                                                   "(`shipped`: the one that ships with tokencache)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--fidelity-to", default=None, help="npz of the full (uncached) run with the same seed: "
                                                        "adds PSNR/SSIM of each image to its uncached twin")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples of the samples for the 95%% intervals (0: none; default: 1000)")
    p.add_argument("--bootstrap-seed", type=int, default=0,
                   help="seed of the resampled index sets (the same for every run: intervals of differences pair up)")
    p.add_argument("--out", default=None, help="also write the JSON here (and the bootstrap values beside it, "
                                               "<name>.bootstrap.npz)")
    p.add_argument("--reference-features", default=None, metavar="NPZ",
                   help="the reference images' features from `tokencache reference-features` (instead of extracting "
                        "them for this evaluation; checked against --reference and --weights)")

    p = add("reference-features", cmd_reference_features,
            "extract a reference batch's image features once, for every `evaluate --reference-features`")
    p.add_argument("reference", help="ADM reference batch .npz with images (arr_0); `shipped`: the digits testbed's")
    p.add_argument("--features", choices=["inception", "digits"], default="inception")
    p.add_argument("--weights", default=None, help="Inception weights file, or the digits evaluator .pt (`shipped`)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="features .npz")

    p = add("flops", cmd_flops, "MACs (the DiT paper's 'Gflops') of one forward, or per image of a sampling run")
    p.add_argument("--model", default=None, help="preset or family, e.g. DiT-XL/2")
    p.add_argument("--model-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="constructor overrides, e.g. input_size=64")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--analytic-only", action="store_true", help="skip the fvcore trace (fast for XL models)")
    p.add_argument("--run", default=None, help="a sampling run's JSON (beside its npz): MACs per generated image")

    p = add("latency", cmd_latency, "time methods side by side (interleaved) over batch sizes, with provenance")
    p.add_argument("--checkpoint", default=None, help="checkpoint; or --model alone for random weights")
    p.add_argument("--model", default=None, help="preset (e.g. DiT-XL/2)")
    p.add_argument("--model-set", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--method", action="append", default=[], metavar="[LABEL=]NAME[:KEY=VALUE,…]",
                   help="a method to time (repeatable), e.g. fora3=fora:interval=3, or all (every registered "
                        "method at its defaults); the uncached reference is always included")
    p.add_argument("--sampler", default="ddim50")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1], help="images per batch (CFG doubles rows)")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--scale-pow", type=float, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16", "float16"],
                   help="autocast dtype (default: float32); the weights stay float32 unless --cast-weights")
    p.add_argument("--cast-weights", action="store_true",
                   help="also cast the weights to --dtype (saves autocast's per-call weight casts)")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=None,
                   help="TF32 for cuBLAS and cuDNN float32 work on/off (default: torch's setting; recorded)")
    p.add_argument("--compile", default="none", choices=["none", "default", "reduce-overhead", "max-autotune"],
                   help="torch.compile the blocks' attention and MLP branches (compile time is kept out of the "
                        "timed rounds and reported; CUDA-graph modes need --warmup 2)")
    p.add_argument("--compile-backend", default="inductor", choices=["inductor", "aot_eager", "eager"],
                   help="torch.compile backend (eager/aot_eager capture graphs without generating code: a quick "
                        "check of the wiring)")
    p.add_argument("--decision-timing", action=argparse.BooleanOptionalAction, default=True,
                   help="one extra round per method and batch size measuring the time inside the method's own "
                        "decisions (not part of the timed rounds; default: on)")
    p.add_argument("--random-calibration", default=None, metavar="DIR",
                   help="write random calibration files here for methods given without one (timing only; each "
                        "method documents its stand-in)")
    p.add_argument("--vae", default=None, help="also time end-to-end with this VAE (latent models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", default=None)
    p.add_argument("--md", default=None)
    p.add_argument("--out", default=None, help="JSON of all rows")

    p = add("latency-report", cmd_latency_report,
            "latency JSON files → latency.csv, latency.md and a realization-ratio plot in one folder")
    p.add_argument("runs", nargs="+", help="JSON files written by `tokencache latency --out`")
    p.add_argument("--out-dir", required=True, help="folder for latency.csv, latency.md, realization_ratio.png")

    p = add("merge", cmd_merge, "merge sampling shards (npz + their JSON) of one run, in sample order")
    p.add_argument("shards", nargs="+", help="shard .npz files (each with its .json beside it)")
    p.add_argument("--out", required=True, help="merged .npz")

    from tokencache.compare import DEFAULT_RTOL, DEFAULT_TOLERANCE

    p = add("compare", cmd_compare, "whether two results folders agree, table by table, in units of each number's "
                                    "bootstrap interval (exit 0: agree, 1: not)")
    p.add_argument("results_a", metavar="RESULTS_A", help="a workflow's results folder (results/<name>)")
    p.add_argument("results_b", metavar="RESULTS_B", help="another results folder of the same config")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="largest difference of a table number, in half-widths of its 95%% interval, for the folders "
                        f"to agree (default: {DEFAULT_TOLERANCE})")
    p.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                   help=f"largest relative difference of a number without an interval (default: {DEFAULT_RTOL:g})")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # glibc: no page fault per activation on every forward (tokencache/_allocator.py)
    previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    stderr = sys.stderr = _LineTracker(sys.stderr)  # progress bars write here: know where the line is
    try:
        if args.plugins:
            from tokencache.cache import load_plugins

            for folder in args.plugins:
                load_plugins(folder)
        check_arguments(args)
        if hasattr(args, "threads"):
            args.threads = set_threads(args.threads)
        args.fn(args)
    except KeyboardInterrupt:
        _close_progress_bars()
        stderr.new_line()
        print("tokencache: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        _close_progress_bars()
        stderr.new_line()  # a traceback, like the one line, starts on a line of its own
        if not is_users_error(exc) or os.environ.get("TOKENCACHE_DEBUG"):
            raise
        print(f"tokencache: error: {error_line(exc)}", file=sys.stderr)
        return 2
    finally:
        sys.stderr = stderr.stream
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


# --------------------------------------------------------------------------- failing safe


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors in one line (``tokencache sample: error: … (see --help)``), exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


#: numeric arguments and their ranges (flag name from the attribute: num_samples → --num-samples)
NUMBER_RULES = {
    "seed": dict(minimum=0, integer=True), "bootstrap_seed": dict(minimum=0, integer=True),
    "start_index": dict(minimum=0, integer=True), "num_samples": dict(minimum=1, integer=True),
    "reference_images": dict(minimum=2, integer=True),
    "batch_size": dict(minimum=1, integer=True), "batch_sizes": dict(minimum=1, integer=True),
    "steps": dict(minimum=1, integer=True), "threads": dict(minimum=1, integer=True),
    "repeats": dict(minimum=1, integer=True), "warmup": dict(minimum=0, integer=True),
    "bootstrap": dict(minimum=0, integer=True),
    "cfg_scale": dict(minimum=0), "scale_pow": dict(minimum=0, exclusive_minimum=True),
    "lr": dict(minimum=0, exclusive_minimum=True), "grad_clip": dict(minimum=0),
}


def check_arguments(args) -> None:
    """Every numeric argument in its range, before any work (one line naming the flag)."""
    from tokencache.checks import check_number

    for name, rule in NUMBER_RULES.items():
        if getattr(args, name, None) is not None:
            check_number(name, getattr(args, name), **rule)
    if getattr(args, "bootstrap", 0) == 1:
        raise ValueError("--bootstrap must be 0 (no intervals) or at least 2 resamples, got 1")


def set_threads(threads) -> int:
    """Set torch's CPU threads; return the number.

    Default: ``OMP_NUM_THREADS`` when set (a scheduler's or the workflow's choice), else the CPUs
    available to this process (affinity mask, cgroup quota) that no other process is using now
    (:func:`tokencache.provenance.idle_cpus`): a thread that shares its core with another process
    holds up the others, so threads on busy cores are slower than one thread.
    """
    import torch

    from tokencache.provenance import idle_cpus

    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    threads = threads or (int(env) if env.isdigit() and int(env) > 0 else idle_cpus())
    torch.set_num_threads(threads)
    limit_blas_threads(threads)
    return threads


def limit_blas_threads(threads: int) -> None:
    """NumPy's and SciPy's BLAS (OpenBLAS) to ``threads`` too: left at one per core, their spinning
    threads tripled the CPU time of two evaluations running side by side on two cores."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a scikit-learn dependency, declared in pyproject.toml
        return
    threadpool_limits(threads)


def _out_of_memory(exc: BaseException) -> bool:
    """Host or device memory ran out (torch's ``OutOfMemoryError`` is a RuntimeError, not a MemoryError)."""
    torch = sys.modules.get("torch")  # an error from torch means torch is loaded; never import it here
    return isinstance(exc, MemoryError) or isinstance(exc, getattr(torch, "OutOfMemoryError", ()))


def is_users_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the user's to fix (one line, exit 2) rather than a bug (its traceback).

    The user's: :data:`USER_ERRORS`, OS errors (permissions, a full disk) and running out of
    memory (a smaller --batch-size helps). Everything else, RuntimeError included, is a bug.
    """
    return isinstance(exc, USER_ERRORS + (OSError,)) or _out_of_memory(exc)


def error_line(exc: BaseException) -> str:
    """One line for an error: the message's first line; OS errors name the file and the fix."""
    if _out_of_memory(exc):
        return "out of memory: lower --batch-size (or free memory)"
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError) and exc.errno is not None:
        where = f" ({exc.filename})" if exc.filename else ""
        fixes = {errno.ENOSPC: "free disk space or choose another --out",
                 errno.EDQUOT: "free disk space (quota) or choose another --out",
                 errno.EACCES: "choose another --out or fix the permissions",
                 errno.EPERM: "choose another --out or fix the permissions",
                 errno.EROFS: "the file system is read-only: choose another --out",
                 errno.EISDIR: "give a file path, not a folder",
                 errno.ENOTDIR: "a part of the path is a file, not a folder"}
        fix = fixes.get(exc.errno)
        return f"{exc.strerror or type(exc).__name__}{where}" + (f": {fix}" if fix else "")
    message = str(exc).strip()
    if isinstance(exc, KeyError) or not message:
        return type(exc).__name__ + (f": {message}" if message else "")
    return message.splitlines()[0]


def buffered_log(path):
    """A log file written only when the command succeeds (atomically): bad arguments leave none."""
    import contextlib
    import io as _io

    from tokencache.io import write_atomic

    @contextlib.contextmanager
    def cm():
        buffer = _io.StringIO()
        yield buffer
        write_atomic(path, buffer.getvalue())

    return cm()


def resolve_weights(name):
    """``shipped`` → the digits evaluator that ships with tokencache; anything else unchanged."""
    if name == "shipped":
        from tokencache.weights import shipped_path

        return str(shipped_path("digits-evaluator"))
    return name


def resolve_reference(name):
    """``shipped`` → the digits testbed's reference batch that ships with tokencache."""
    if name == "shipped":
        from tokencache.weights import shipped_path

        return str(shipped_path("digits-reference"))
    return name


def bootstrap_path(out) -> Path:
    """Where ``evaluate --out X.json`` writes the per-resample values: ``X.bootstrap.npz``."""
    return Path(out).with_suffix(".bootstrap.npz")


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _terminate(signum, frame):
    """SIGTERM (a scheduler or Snakemake stopping the job) unwinds like Ctrl-C: no temporary file stays."""
    raise KeyboardInterrupt


def _close_progress_bars() -> None:
    """Close the bars an error left open now (their last state, then a newline), not at exit after
    the message."""
    try:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", [])):
            bar.close()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


class _LineTracker:
    """stderr that knows whether its last write ended a line, so that a message after a progress
    bar (interrupted anywhere, even inside its own write) starts on a line of its own."""

    def __init__(self, stream):
        self.stream = stream.stream if isinstance(stream, _LineTracker) else stream
        self.at_line_start = True

    def write(self, text):
        if text:
            self.at_line_start = False  # stays False if the write itself is interrupted
            written = self.stream.write(text)
            self.at_line_start = text.endswith("\n")
            return written
        return 0

    def new_line(self) -> None:
        if not self.at_line_start:
            self.write("\n")

    def __getattr__(self, name):
        return getattr(self.stream, name)


if __name__ == "__main__":
    sys.exit(main())
