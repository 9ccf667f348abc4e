# Evaluation stage: quality metrics of every run against the reference batch.


rule evaluate:
    input:
        npz=f"{RESULTS}/runs/{{model}}/{{sampler}}/{{method}}/samples.npz",
        ref=rules.reference_batch.output.ref,
        net=rules.train_evaluator.output.net,
    output:
        metrics=f"{RESULTS}/runs/{{model}}/{{sampler}}/{{method}}/metrics.json",
    log:
        f"{RESULTS}/logs/evaluate/{{model}}/{{sampler}}/{{method}}.log",
    threads: THREADS
    shell:
        "tokencache evaluate {input.npz} --reference {input.ref} --features digits --weights {input.net} "
        "--out {output.metrics} --json > {log} 2>&1"
