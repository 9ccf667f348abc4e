# Helpers shared by the rules: config validation, names of outputs.
import os

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate


def config_folders():
    """Where a path named in the config is looked for: beside the config files (the last
    ``--configfile`` first), then the working folder."""
    return [os.path.dirname(os.path.abspath(f)) for f in reversed(workflow.configfiles)] + [os.getcwd()]


def merge_config(base: dict, top: dict) -> dict:
    """``top`` over ``base``, mappings merged key by key (a value of ``top`` wins)."""
    merged = dict(base)
    for key, value in top.items():
        merged[key] = merge_config(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) \
            else value
    return merged


def apply_overlay():
    """``overlay_of: FILE`` makes this config an overlay: FILE's keys (a path relative to the
    config file naming it), with this config's keys, and ``--config`` ones, merged on top. The
    rehearsal (config/rehearsal.yaml) is an overlay of config/paper.yaml, so it runs whatever the
    paper config runs, with only what must differ on a CPU changed."""
    import yaml

    base = config.pop("overlay_of", None)
    if base is None:
        return
    path = next((p for p in (os.path.join(d, base) for d in config_folders()) if os.path.isfile(p)), None)
    if path is None:
        raise ValueError(f"config: overlay_of: {base} not found (looked beside the config file and in {os.getcwd()})")
    with open(path) as f:
        merged = merge_config(yaml.safe_load(f), config)
    config.clear()
    config.update(merged)


def validate_config():
    """Schema validation (fills defaults); a mistake ends in one line naming the key, e.g.
    ``config: num_samples: -8 is less than the minimum of 1``. ``--config report=false`` arrives
    as the string "false" (Snakemake's command-line parsing), which means the boolean."""
    if isinstance(config.get("report"), str) and config["report"].lower() in ("true", "false"):
        config["report"] = config["report"].lower() == "true"
    try:
        validate(config, schema="../schemas/config.schema.yaml")
    except WorkflowError as err:
        cause = err.__cause__ or err.__context__  # jsonschema's ValidationError
        if not hasattr(cause, "absolute_path"):
            raise
        key = ".".join(str(part) for part in cause.absolute_path) or "(top level)"
        raise ValueError(f"config: {key}: {cause.message}") from None


apply_overlay()
validate_config()


def plugin_folders():
    """The ``plugins:`` folders of the config as absolute paths: relative to the config file that
    names them (the last ``--configfile`` first), else to the working folder. A missing one is
    one line naming where it was looked for."""
    folders = []
    for entry in config.get("plugins", []):
        tried = [os.path.normpath(os.path.join(base, os.path.expanduser(entry))) for base in config_folders()]
        found = next((path for path in tried if os.path.isdir(path)), None)
        if found is None:
            raise ValueError(f"config: plugins: folder {entry!r} not found (looked in {', '.join(dict.fromkeys(tried))})")
        folders.append(found)
    return folders


def load_config_plugins():
    """Load the ``plugins:`` folders here and hand them to every job through ``$TOKENCACHE_PLUGINS``
    (shell jobs, scripts and cluster jobs inherit the environment; a cluster job re-parses this
    file and sets it again)."""
    from tokencache.cache.registry import PLUGIN_PATH_VARIABLE, load_plugins

    folders = plugin_folders()
    if not folders:
        return
    config["plugins"] = folders  # absolute: the report's inner run reads this config from elsewhere
    inherited = [p for p in os.environ.get(PLUGIN_PATH_VARIABLE, "").split(os.pathsep) if p]
    os.environ[PLUGIN_PATH_VARIABLE] = os.pathsep.join(dict.fromkeys(folders + inherited))
    for folder in folders:
        try:
            load_plugins(folder)
        except RuntimeError as exc:
            raise ValueError(f"config: plugins: {exc}") from None


load_config_plugins()

RESULTS = f"results/{config['name']}"
BACKBONES = list(config["backbones"])
SAMPLERS = list(config["samplers"])
THREADS = int(config.get("threads", 2))


def model_id(name):
    """Preset names hold '/', which cannot be part of a path: DiT-XL/2 → DiT-XL_2."""
    return name.replace("/", "_")


MODEL_IDS = {model_id(m): m for m in BACKBONES}


def shard_ranges():
    """(start, count) of each sampling shard; shards are independent jobs."""
    n, size = config["num_samples"], config["shard_size"]
    return [(start, min(size, n - start)) for start in range(0, n, size)]


#: downloaded files (official checkpoints, reference batch, Inception weights), shared by configs
DOWNLOADS = config.get("downloads", "checkpoints")
#: feature extractor of the quality metrics: the digits CNN (testbed) or ADM's Inception (ImageNet)
FEATURES = config.get("features", "digits")


def backbone_checkpoint(preset):
    """The checkpoint file of a backbone that is not trained by the workflow, else None.

    ``checkpoint: shipped`` is the testbed weights that ship inside tokencache (checked against
    their sha256, tokencache/weights/), ``official`` the official 256-px file of the preset
    (downloaded by the ``download_checkpoint`` rule, download.smk), an official file name
    (``DiT-XL-2-512x512.pt``) is that file, anything else is a local path used as it is.
    """
    name = config["backbones"][preset].get("checkpoint")
    if name is None:
        return None
    from tokencache.models.checkpoints import OFFICIAL_WEIGHTS

    if name == "shipped":
        from tokencache.weights import shipped_names, shipped_path

        if preset not in shipped_names():
            shipped = ", ".join(n for n in shipped_names() if n.endswith("-digits"))
            raise ValueError(f"config: backbones.{preset}.checkpoint: no shipped weights for {preset!r} (shipped: "
                             f"{shipped}); train it with `steps: …` or give a checkpoint file")
        try:
            return str(shipped_path(preset))
        except ValueError as exc:
            raise ValueError(f"config: backbones.{preset}.checkpoint: {exc}") from None

    if name == "official":
        fits = [f for f, w in OFFICIAL_WEIGHTS.items() if w.preset == preset and w.overrides.get("input_size") == 32]
        if len(fits) != 1:
            known = ", ".join(sorted({w.preset for w in OFFICIAL_WEIGHTS.values()}))
            raise ValueError(f"config: backbones.{preset}.checkpoint: no official 256-px checkpoint of {preset!r} "
                             f"(official presets: {known}); give a file name or a path")
        name = fits[0]
    # official files keep their names: the sampler recognises the architecture by the file name
    if name in OFFICIAL_WEIGHTS:
        return f"{DOWNLOADS}/{name}"
    if not os.path.isfile(name):
        raise ValueError(f"config: backbones.{preset}.checkpoint: {name} is not a file (give `shipped`, `official`, "
                         f"an official file name or the path of a checkpoint)")
    return name


def checkpoint_path(wildcards):
    """The backbone's weights: downloaded or given (``checkpoint:``), else trained by train_backbone."""
    return backbone_checkpoint(MODEL_IDS[wildcards.model]) or f"{RESULTS}/backbones/{wildcards.model}.pt"


#: a backbone's own guidance, over its sampler's (MDT: cfg 3.8 with scale_pow 4, DiT: 1.5)
GUIDANCE_KEYS = ("cfg_scale", "scale_pow")


def sampler_settings(model, sampler):
    """Sampler options of a model (model id) and sampler, with the backbone's guidance on top."""
    opts = dict(config["samplers"][sampler])
    backbone = config["backbones"][MODEL_IDS[model]]
    opts.update({k: backbone[k] for k in GUIDANCE_KEYS if k in backbone})
    return opts


def model_set_options(wildcards):
    """`` --model-set KEY=VALUE …`` (a leading space) from a backbone's ``model_set:`` (constructor
    keywords over the checkpoint's architecture, e.g. the rehearsal's narrow stand-ins of the
    official files), or ''."""
    model_set = config["backbones"][MODEL_IDS[wildcards.model]].get("model_set", {})
    return " --model-set " + " ".join(f"{k}={v}" for k, v in model_set.items()) if model_set else ""


def sampler_options(wildcards):
    opts = sampler_settings(wildcards.model, wildcards.sampler)
    args = [f"--cfg-scale {opts['cfg_scale']}"]
    if "scale_pow" in opts:
        args.append(f"--scale-pow {opts['scale_pow']}")
    if opts.get("clip_denoised", False):
        args.append("--clip-denoised")
    return " ".join(args)


METHODS = config["methods"]
#: the tuning stage (tune.smk): ``tuning.methods`` are families whose search spaces are tuned
TUNING = config.get("tuning") or {}
FAMILIES = TUNING.get("methods", {})


def spec_of(entry):
    """(method name, parameters) of a ``methods:`` or ``tuning.methods:`` entry: ``method: NAME[:k=v,…]``
    plus an optional ``params:`` mapping."""
    from tokencache.cache import parse_method_spec

    params = dict(entry.get("params", {}))
    files = {k: v for k, v in params.items() if v == "auto"}  # filled in per model and sampler below
    name, given = parse_method_spec(entry["method"])
    return name, {**given, **{k: v for k, v in params.items() if k not in files}, **files}


def config_entries():
    """(where in the config, entry) of every ``methods:`` label and ``tuning.methods:`` family."""
    return ([(f"methods.{label}", spec) for label, spec in METHODS.items()]
            + [(f"tuning.methods.{family}", spec) for family, spec in FAMILIES.items()])


def method_entry(label):
    """The config entry of run ``label``: a ``methods:`` label, or a tuned point of a ``tuning.methods`` family."""
    from tokencache.tuning import split_label

    if label in METHODS:
        return METHODS[label]
    family = split_label(label)[0]  # a tuned point's run label: FAMILY@k=v,… (tokencache.tuning.point_label)
    if family in FAMILIES:
        return FAMILIES[family]
    raise ValueError(f"run {label!r} is neither a label of methods nor a tuned point of tuning.methods")


def method_of(label):
    """(method name, parameters) of run ``label``; a tuned point's knobs over its family's setting."""
    from tokencache.cache import parse_method_spec

    name, params = spec_of(method_entry(label))
    if label not in METHODS:
        from tokencache.tuning import split_label

        slug = split_label(label)[1]
        if slug != "configured":
            params.update(parse_method_spec(f"{name}:{slug}")[1])
    return name, params


def calibration_param(name):
    """The parameter of method ``name`` that takes a calibration file, or None."""
    from tokencache.cache import method_class

    calibration = method_class(name).calibration
    return None if calibration is None else calibration.file_param


def calibration_id(label):
    """The calibration artefact run ``label`` needs from the workflow (its ``FILE: auto``), or None."""
    return spec_calibration_id(*method_of(label))


def spec_calibration_id(name, params):
    """The calibration artefact a method setting needs from the workflow (its ``FILE: auto``), or None."""
    from tokencache.cache import get_method

    key = calibration_param(name)
    if key is None or params.get(key) != "auto":
        return None
    return get_method(name, **{k: v for k, v in params.items() if k != key}).calibration_id()


def check_methods():
    """Unknown methods or parameters fail here, before any job runs (plugins included)."""
    from tokencache.cache import get_method, reference_method

    reference = reference_method()
    if "full" not in METHODS or method_of("full")[0] != reference:
        raise ValueError(f"config: methods must contain `full: {{method: {reference}}}` (every method's fidelity "
                         "reference)")
    for where, spec in config_entries():
        for key, known in (("models", BACKBONES), ("samplers", SAMPLERS)):
            unknown = sorted(set(spec.get(key, known)) - set(known))
            if unknown:
                raise ValueError(f"config: {where}.{key}: {unknown[0]!r} is not in {key} ({', '.join(known)})")
        try:
            name, params = spec_of(spec)
            key = calibration_param(name)
            for k, v in params.items():
                if v == "auto" and k != key:
                    raise ValueError(f"{name}: parameter {k} cannot be auto (only {key or 'a calibration file'})")
            get_method(name, **{k: ("<made by the workflow>" if v == "auto" else v) for k, v in params.items()})
        except (ValueError, RuntimeError) as exc:
            raise ValueError(f"config: {where}: {exc}") from None


check_methods()
for _preset in BACKBONES:
    backbone_checkpoint(_preset)  # a wrong `checkpoint:` fails here, before any job runs


def calibration_path(calibration, model, sampler):
    """Where the workflow writes calibration ``calibration`` (an id) of a model and sampler."""
    return f"{RESULTS}/calibration/{model}/{sampler}/{calibration}.pt"


def calibration_method(calibration):
    """``NAME:k=v`` of a run that needs calibration ``calibration`` (the file parameter left out)."""
    from tokencache.cache.registry import method_spec

    for name, params in [method_of(label) for label in METHODS] + [spec_of(entry) for entry in FAMILIES.values()]:
        if spec_calibration_id(name, params) == calibration:
            return method_spec(name, {k: v for k, v in params.items() if k != calibration_param(name)})
    raise ValueError(f"no run needs calibration {calibration!r}")


def calibration_settings(calibration):
    """The config's training settings of calibration ``calibration`` (``calibration: {id: {…}}``)."""
    settings = config.get("calibration", {}).get(calibration, {})
    return " ".join(f"{k}={v}" for k, v in settings.items())


def check_backbones_and_samplers():
    """Backbone presets, sampler names and each method's sampler (a method may change it) are
    checked when the DAG is built, so a typo fails before any backbone training, not minutes later."""
    from tokencache.cache import get_method
    from tokencache.models.registry import resolve
    from tokencache.sampling import parse_sampler

    for preset in BACKBONES:
        try:
            resolve(preset)
        except ValueError as exc:
            raise ValueError(f"config: backbones.{preset}: {exc}") from None
    for sampler in SAMPLERS:
        try:
            parse_sampler(sampler)
        except ValueError as exc:
            raise ValueError(f"config: samplers.{sampler}: {exc}") from None
    for where, spec in config_entries():
        name, params = spec_of(spec)
        method = get_method(name, **{k: ("<made by the workflow>" if v == "auto" else v) for k, v in params.items()})
        for sampler in spec.get("samplers", SAMPLERS):
            try:
                method.transform_sampler(parse_sampler(sampler))
            except ValueError as exc:
                raise ValueError(f"config: {where}: with sampler {sampler}: {exc}") from None

check_backbones_and_samplers()

#: the digits evaluator and its reference batch: shipped with tokencache, or trained by the workflow
EVALUATOR_SOURCE = config.get("testbed", {}).get("evaluator", "shipped")


def evaluator_files():
    """(evaluator .pt, reference .npz) the digits evaluation uses."""
    if EVALUATOR_SOURCE == "shipped":
        from tokencache.weights import shipped_path

        return str(shipped_path("digits-evaluator")), str(shipped_path("digits-reference"))
    return f"{RESULTS}/evaluator/digits_cnn.pt", f"{RESULTS}/reference/digits_test.npz"


EVALUATOR, REFERENCE = evaluator_files()  # (the `evaluate` rule exists for every config; inception uses its own)
#: bootstrap intervals of the evaluation (resamples 0: none) and the seed of the shared index sets
BOOTSTRAP = {"resamples": 1000, "seed": 0, **config.get("bootstrap", {})}


def image_side(preset):
    """Pixels per side of a backbone's saved images (latent models decode to 8× their latent side)."""
    from tokencache.models.checkpoints import OFFICIAL_WEIGHTS
    from tokencache.models.registry import resolve

    _, kw = resolve(preset)
    name = config["backbones"][preset].get("checkpoint")
    official = OFFICIAL_WEIGHTS.get(os.path.basename(backbone_checkpoint(preset) or "")) if name else None
    kw.update(official.overrides if official else {})
    kw.update(config["backbones"][preset].get("model_set", {}))
    return int(kw.get("input_size", 32)) * (8 if kw.get("in_channels", 4) == 4 else 1)


def vae_inputs(model):
    """The VAE's download marker (download.smk) for a backbone on official weights: all are latent models."""
    path = backbone_checkpoint(MODEL_IDS[model])
    return [f"{DOWNLOADS}/vae-ema.json"] if path and path.startswith(f"{DOWNLOADS}/") else []


def setting_inputs(name, params, wildcards):
    """Files a method setting needs beyond the checkpoint (a calibration for ``FILE: auto``, the VAE)."""
    calibration = spec_calibration_id(name, params)
    made = [calibration_path(calibration, wildcards.model, wildcards.sampler)] if calibration else []
    return made + vae_inputs(wildcards.model)


def setting_options(name, params, wildcards):
    """``--method NAME:k=v,…`` of a method setting, with its calibration file where the workflow makes it."""
    from tokencache.cache.registry import method_spec

    calibration = spec_calibration_id(name, params)
    if calibration:
        params = {**params, calibration_param(name): calibration_path(calibration, wildcards.model, wildcards.sampler)}
    return f"--method {method_spec(name, params)}"


def method_inputs(wildcards):
    """Files a run needs beyond the checkpoint."""
    return setting_inputs(*method_of(wildcards.method), wildcards)


def method_options(wildcards):
    """``--method …`` of a run."""
    return setting_options(*method_of(wildcards.method), wildcards)


def torch_threads(n):
    """Threads of in-process (``run:``) jobs that use torch."""
    import torch

    torch.set_num_threads(max(1, int(n)))


def runs_method(label, model, sampler):
    """Whether run ``label`` is configured for this backbone and sampler (``models``/``samplers`` keys)."""
    spec = METHODS[label]
    return MODEL_IDS[model] in spec.get("models", BACKBONES) and sampler in spec.get("samplers", SAMPLERS)


def tuned_families():
    """(model id, sampler, family) of every tuning job: ``tuning.models``/``samplers`` (default: all),
    and each family's own ``models``/``samplers``."""
    models = [model_id(m) for m in TUNING.get("models", BACKBONES)]
    samplers = TUNING.get("samplers", SAMPLERS)
    return [(m, s, family) for m in models for s in samplers for family, spec in FAMILIES.items()
            if MODEL_IDS[m] in spec.get("models", BACKBONES) and s in spec.get("samplers", SAMPLERS)]


def tuned_pairs():
    """(model id, sampler) pairs that have a tuning stage, in config order."""
    return list(dict.fromkeys((m, s) for m, s, _ in tuned_families()))


def run_dirs(methods=None):
    return [f"{RESULTS}/runs/{m}/{s}/{label}" for m in MODEL_IDS for s in SAMPLERS for label in (methods or METHODS)
            if runs_method(label, m, s)]


def calibration_files():
    """The calibration files the runs use (made by the workflow for ``auto``, or given), sorted."""
    settings = [(m, s, *method_of(label)) for m in MODEL_IDS for s in SAMPLERS for label in METHODS
                if runs_method(label, m, s)]
    settings += [(m, s, *spec_of(FAMILIES[family])) for m, s, family in tuned_families()]
    files = set()
    for m, s, name, params in settings:
        key = calibration_param(name)
        if key is None or not params.get(key):
            continue
        calibration = spec_calibration_id(name, params)
        files.add(calibration_path(calibration, m, s) if calibration else params[key])
    return sorted(files)


def ablation_labels():
    """Labels of the ablation table's runs (``ablation:`` in the config): variants of one method."""
    labels = list(config.get("ablation", []))
    unknown = [label for label in labels if label not in METHODS]
    if unknown:
        raise ValueError(f"config: ablation: {unknown[0]!r} is not a label of methods")
    if len({method_of(label)[0] for label in labels}) > 1:
        raise ValueError("config: ablation: the labels must be variants of one method")
    return labels


ablation_labels()


def plot_outputs():
    """The figures of the ``plots`` rule (name → path); what was calibrated only when calibrations exist."""
    names = ["pareto_macs", "pareto_latency", "pareto_psnr", "macs_vs_fid", "token_fraction"]
    if calibration_files():
        names.append("calibration")
    if TUNING:
        names.append("tuning")
    return {name: f"{RESULTS}/plots/{name}.png" for name in names}


def final_outputs():
    return [
        f"{RESULTS}/tables/main.csv",
        f"{RESULTS}/tables/main.md",
        f"{RESULTS}/tables/ablation.csv",
        f"{RESULTS}/tables/ablation.md",
        f"{RESULTS}/tables/latency.csv",
        f"{RESULTS}/tables/latency.md",
        *budget_outputs().values(),
        *plot_outputs().values(),
        f"{RESULTS}/plots/samples_grid.png",
    ]


def write_report(cfg: dict, snakefile: str) -> None:
    """After a successful run: ``snakemake --report RESULTS/report.html`` for this run's config.

    The merged config goes to the inner call as one YAML file, so ``--configfile`` and ``--config``
    choices carry over. Written to a temporary name and renamed, so a killed report leaves no half
    file; a failure is one warning line with the command to retry, not a failed run.
    """
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import yaml

    out, tmp = Path(RESULTS) / "report.html", Path(RESULTS) / ".report.part.html"
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(cfg, f)
    exe = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or "snakemake"
    cmd = [exe, "--snakefile", snakefile, "--configfile", f.name, "--report", str(tmp), "--nolock", "--quiet"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode == 0 and tmp.exists():
            os.replace(tmp, out)
            print(f"report: {out}", file=sys.stderr)
        else:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"report: not written ({tail}); retry with `snakemake --report {out}`", file=sys.stderr)
    finally:
        os.unlink(f.name)
        tmp.unlink(missing_ok=True)


def check_results_folder():
    """Before any job runs (``onstart``): the results folder is writable and its disk can hold the
    samples still to be written (runs × num_samples images of each backbone's size). One line each."""
    import shutil

    from tokencache.checks import DISK_MARGIN_BYTES, human_bytes, probe_write, sample_file_bytes

    missing = [d for d in run_dirs() if not os.path.exists(f"{d}/samples.npz")]
    needed = sum(sample_file_bytes(config["num_samples"], image_side(MODEL_IDS[d.split("/")[-3]])) for d in missing)
    try:
        os.makedirs(RESULTS, exist_ok=True)
        probe_write(RESULTS)
    except OSError as exc:
        raise ValueError(f"results: cannot write in {RESULTS} ({exc.strerror or type(exc).__name__}): make it writable "
                         f"or write elsewhere with --config name=OTHER") from None
    free = shutil.disk_usage(RESULTS).free
    if free < needed + DISK_MARGIN_BYTES:
        raise ValueError(f"results: {len(missing)} runs of {config['num_samples']} samples need about "
                         f"{human_bytes(needed)} in {RESULTS} but only {human_bytes(free)} are free on that disk: "
                         f"free space, or lower num_samples")
