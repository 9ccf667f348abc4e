# Evaluation stage: quality metrics of every run against the reference batch, and each cached
# run's fidelity to the full run of the same model, sampler and seed (one full run serves all).


def full_run(wildcards):
    if wildcards.method == "full":
        return []
    return f"{RESULTS}/runs/{wildcards.model}/{wildcards.sampler}/full/samples.npz"


rule evaluate:
    input:
        npz=f"{RESULTS}/runs/{{model}}/{{sampler}}/{{method}}/samples.npz",
        ref=REFERENCE,
        net=EVALUATOR,
        full=full_run,
    output:
        metrics=f"{RESULTS}/runs/{{model}}/{{sampler}}/{{method}}/metrics.json",
        boot=f"{RESULTS}/runs/{{model}}/{{sampler}}/{{method}}/metrics.bootstrap.npz",
        provenance=f"{RESULTS}/runs/{{model}}/{{sampler}}/{{method}}/metrics.provenance.json",
    params:
        resamples=BOOTSTRAP["resamples"],
        seed=BOOTSTRAP["seed"],
    threads: THREADS
    run:
        # in the workflow's own process: the evaluator's imports would cost more than the metrics
        from pathlib import Path

        from tokencache.io import write_atomic
        from tokencache.metrics.quality import evaluate_run

        torch_threads(threads)
        from threadpoolctl import threadpool_limits

        # NumPy's and SciPy's OpenBLAS too (process-wide, like torch's setting): with a thread per core,
        # two evaluations side by side spun four BLAS threads on two cores, 2.6× the CPU time
        threadpool_limits(threads)
        result = evaluate_run(input.npz, input.ref, features="digits", weights_path=input.net,
                              fidelity_to=input.full or None, bootstrap=params.resamples,
                              bootstrap_seed=params.seed, bootstrap_out=output.boot)
        if not params.resamples:  # the declared output, empty: no intervals were asked for
            write_atomic(output.boot, {}, format="npz")
        from tokencache.results import write_split

        # metrics.json is deterministic; the machine, timings and absolute paths go to metrics.provenance.json
        write_split(output.metrics, result, RESULTS)
