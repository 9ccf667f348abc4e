# Sampling stage: independent shards (one job each, so many GPUs can share 50,000 samples),
# then a merge. Sample i depends only on (seed, i), so the shard count never changes results.
# With `gpus_per_job: N` (N > 1) each shard runs data-parallel on N local GPUs under torchrun.

#: GPUs one sampling job uses (several: one process per GPU through torchrun, one merged shard)
GPUS_PER_JOB = int(config.get("gpus_per_job", 1)) if config["device"] == "cuda" else 1
SAMPLE_LAUNCHER = (f"torchrun --standalone --nproc_per_node {GPUS_PER_JOB} -m tokencache" if GPUS_PER_JOB > 1
                   else "tokencache")


rule sample_shard:
    input:
        ckpt=checkpoint_path,
        extra=method_inputs,
    output:
        npz=temp(f"{RESULTS}/runs/{{model}}/{{sampler}}/{{method}}/shards/{{first}}_{{size}}.npz"),
        meta=temp(f"{RESULTS}/runs/{{model}}/{{sampler}}/{{method}}/shards/{{first}}_{{size}}.json"),
    log:
        f"{RESULTS}/logs/sample/{{model}}/{{sampler}}/{{method}}/{{first}}_{{size}}.log",
    params:
        opts=sampler_options,
        model_set=model_set_options,
        method=method_options,
        seed=config["seed"],
        batch=config["batch_size"],
        device=config["device"],
        launcher=SAMPLE_LAUNCHER,
    threads: THREADS
    resources:
        gpu=GPUS_PER_JOB if config["device"] == "cuda" else 0,
    shell:
        "{params.launcher} sample --checkpoint {input.ckpt}{params.model_set} --sampler {wildcards.sampler} "
        "{params.opts} {params.method} --seed {params.seed} --start-index {wildcards.first} --num-samples {wildcards.size} "
        "--batch-size {params.batch} --device {params.device} --threads {threads} --out {output.npz} --quiet --json "
        "> {log} 2>&1"


rule merge_shards:
    input:
        npz=lambda w: [
            f"{RESULTS}/runs/{w.model}/{w.sampler}/{w.method}/shards/{s}_{c}.npz" for s, c in shard_ranges()
        ],
        meta=lambda w: [
            f"{RESULTS}/runs/{w.model}/{w.sampler}/{w.method}/shards/{s}_{c}.json" for s, c in shard_ranges()
        ],
    output:
        npz=f"{RESULTS}/runs/{{model}}/{{sampler}}/{{method}}/samples.npz",
        meta=f"{RESULTS}/runs/{{model}}/{{sampler}}/{{method}}/run.json",
        provenance=f"{RESULTS}/runs/{{model}}/{{sampler}}/{{method}}/run.provenance.json",
    run:
        # in the workflow's own process: a merge is a copy, not worth a Python start-up per run.
        # run.json is deterministic; the machine, timings and absolute paths go to run.provenance.json
        from tokencache.results import write_split
        from tokencache.run import merge_shards

        write_split(output.meta, merge_shards(list(input.npz), output.npz), RESULTS)
