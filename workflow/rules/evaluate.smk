# Evaluation stage: quality metrics of every run against the reference batch, and each cached
# run's fidelity to the full run of the same model, sampler and seed (one full run serves all).


def full_run(wildcards):
    if wildcards.method == "full":
        return []
    return f"{RESULTS}/runs/{wildcards.model}/{wildcards.sampler}/full/samples.npz"


rule evaluate:
    input:
        npz=f"{RESULTS}/runs/{{model}}/{{sampler}}/{{method}}/samples.npz",
        ref=rules.reference_batch.output.ref,
        net=rules.train_evaluator.output.net,
        full=full_run,
    output:
        metrics=f"{RESULTS}/runs/{{model}}/{{sampler}}/{{method}}/metrics.json",
    log:
        f"{RESULTS}/logs/evaluate/{{model}}/{{sampler}}/{{method}}.log",
    params:
        fidelity=lambda w, input: f"--fidelity-to {input.full}" if input.full else "",
    threads: THREADS
    shell:
        "OMP_NUM_THREADS={threads} tokencache evaluate {input.npz} --reference {input.ref} --features digits "
        "--weights {input.net} {params.fidelity} --out {output.metrics} --quiet --json > {log} 2>&1"
