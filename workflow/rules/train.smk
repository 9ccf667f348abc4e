# Training stage: the testbed backbones and the digits evaluator (Inception's stand-in), when the
# config asks for them to be trained (by default both ship with tokencache), and the methods'
# calibrations (their trained or fitted parts: L2C's router, TokenCache's predictor, …).


rule train_backbone:
    # only for backbones without `checkpoint:` (config/smoke.yaml); the default samples from the
    # weights shipped inside tokencache (`checkpoint: shipped`), built by these same commands
    output:
        ckpt=f"{RESULTS}/backbones/{{model}}.pt",
    log:
        f"{RESULTS}/logs/train_backbone/{{model}}.log",
    params:
        preset=lambda w: MODEL_IDS[w.model],
        opts=lambda w: " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in config["backbones"][MODEL_IDS[w.model]].items()
        ),
    threads: THREADS
    resources:
        gpu=0,
    shell:
        "tokencache train-backbone --model {params.preset} {params.opts} --threads {threads} --ema-only "
        "--out {output.ckpt} --quiet --json > {log} 2>&1"


if EVALUATOR_SOURCE == "train":

    rule train_evaluator:
        # early, so that each run's evaluation overlaps the sampling of the others
        priority: 50
        output:
            net=EVALUATOR,
        log:
            f"{RESULTS}/logs/train_evaluator.log",
        params:
            seed=config.get("testbed", {}).get("evaluator_seed", 0),
        threads: THREADS
        shell:
            "tokencache train-evaluator --seed {params.seed} --threads {threads} --out {output.net} --json > {log} 2>&1"

    rule reference_batch:
        priority: 50
        input:
            net=EVALUATOR,
        output:
            ref=REFERENCE,
        log:
            f"{RESULTS}/logs/reference_batch.log",
        threads: THREADS
        shell:
            "tokencache reference --features digits --weights {input.net} --threads {threads} --out {output.ref} "
            "--json > {log} 2>&1"


rule calibrate:
    # one rule for every method with a trained or fitted part (its calibration, from the method class)
    input:
        ckpt=checkpoint_path,
    output:
        file=f"{RESULTS}/calibration/{{model}}/{{sampler}}/{{calibration}}.pt",
    log:
        f"{RESULTS}/logs/calibrate/{{model}}/{{sampler}}/{{calibration}}.log",
    params:
        opts=sampler_options,
        model_set=model_set_options,
        method=lambda w: calibration_method(w.calibration),
        settings=lambda w: calibration_settings(w.calibration),
    threads: THREADS
    resources:
        gpu=1 if config["device"] == "cuda" else 0,
    shell:
        "tokencache calibrate --method {params.method} --checkpoint {input.ckpt}{params.model_set} "
        "--sampler {wildcards.sampler} "
        "{params.opts} --settings {params.settings} --threads {threads} --out {output.file} --quiet --json > {log} 2>&1"
