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
    threads: THREADS
    run:
        # in the workflow's own process: the evaluator's imports would cost more than the metrics
        from pathlib import Path

        from tokencache.metrics.quality import evaluate_run
        from tokencache.run import write_json_atomic

        torch_threads(threads)
        result = evaluate_run(input.npz, input.ref, features="digits", weights_path=input.net,
                              fidelity_to=input.full or None)
        write_json_atomic(Path(output.metrics), result)
