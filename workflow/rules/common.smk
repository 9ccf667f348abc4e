# Helpers shared by the rules: config validation, names of outputs.
from snakemake.utils import validate

validate(config, schema="../schemas/config.schema.yaml")

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


def checkpoint_path(wildcards):
    return f"{RESULTS}/backbones/{wildcards.model}.pt"


def sampler_options(wildcards):
    opts = config["samplers"][wildcards.sampler]
    args = [f"--cfg-scale {opts['cfg_scale']}"]
    if "scale_pow" in opts:
        args.append(f"--scale-pow {opts['scale_pow']}")
    if opts.get("clip_denoised", False):
        args.append("--clip-denoised")
    return " ".join(args)


METHODS = config["methods"]
if "full" not in METHODS or METHODS["full"]["method"] != "full":
    raise ValueError("config: methods must contain `full: {method: full}` (every method's fidelity reference)")


def check_methods():
    """Unknown methods or parameters fail here, before any job runs (plugins in baselines/ included)."""
    from tokencache.cache import get_method

    for label, spec in METHODS.items():
        # "auto" marks a file the workflow makes (the L2C router): any path string validates
        params = {k: ("<made by the workflow>" if v == "auto" else v) for k, v in spec.get("params", {}).items()}
        try:
            get_method(spec["method"], **params)
        except (ValueError, RuntimeError) as exc:
            raise ValueError(f"config: methods.{label}: {exc}") from None


check_methods()


def router_path(model, sampler):
    return f"{RESULTS}/routers/{model}/{sampler}.pt"


def method_inputs(wildcards):
    """Files a run needs beyond the checkpoint (a trained router for router=auto)."""
    params = METHODS[wildcards.method].get("params", {})
    return [router_path(wildcards.model, wildcards.sampler)] if params.get("router") == "auto" else []


def method_options(wildcards):
    spec = METHODS[wildcards.method]
    params = dict(spec.get("params", {}))
    if params.get("router") == "auto":
        params["router"] = router_path(wildcards.model, wildcards.sampler)
    sets = " ".join(f"{k}={v}" for k, v in params.items())
    return f"--method {spec['method']}" + (f" --set {sets}" if sets else "")


def run_dirs(methods=None):
    return [f"{RESULTS}/runs/{m}/{s}/{label}" for m in MODEL_IDS for s in SAMPLERS for label in (methods or METHODS)]


def final_outputs():
    return [
        f"{RESULTS}/tables/main.csv",
        f"{RESULTS}/tables/main.md",
        f"{RESULTS}/plots/samples_grid.png",
    ]
