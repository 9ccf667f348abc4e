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


def run_dirs():
    return [f"{RESULTS}/runs/{m}/{s}/full" for m in MODEL_IDS for s in SAMPLERS]


def final_outputs():
    return [
        f"{RESULTS}/tables/main.csv",
        f"{RESULTS}/tables/main.md",
        f"{RESULTS}/plots/samples_grid.png",
    ]
