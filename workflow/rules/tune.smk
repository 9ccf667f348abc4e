# Tuning stage: every point of each `tuning.methods` family's search space is sampled on the
# tuning seed (never the evaluation or a calibration seed) and scored by MACs speed-up and PSNR to
# the uncached images of the same seed (`tokencache tune`, one job per family). `select_front`
# keeps each family's non-dominated points; only those are then sampled and evaluated on the
# evaluation seed, as runs labelled FAMILY@k=v,… by the ordinary sample/evaluate rules. The
# selection reads the tuning files alone, so no evaluation-seed image can move it.
import json

wildcard_constraints:
    family="[A-Za-z0-9_-]+",


def tuning_seed_clashes():
    """The seeds the tuning seed must differ from: the evaluation seed and every calibration seed in use."""
    import dataclasses

    from tokencache.cache import method_class

    seeds = {"seed (evaluation)": config["seed"]}
    for path in calibration_files():
        calibration = os.path.splitext(os.path.basename(path))[0]
        if not path.startswith(f"{RESULTS}/calibration/"):
            continue  # a given file: its seed is not the workflow's to know
        name = calibration_method(calibration).split(":")[0]
        defaults = {f.name: f.default for f in dataclasses.fields(method_class(name).calibration)}
        seed = config.get("calibration", {}).get(calibration, {}).get("seed", defaults.get("seed"))
        if seed is not None:
            seeds[f"calibration.{calibration}.seed"] = seed
    return seeds


def check_tuning():
    """``tuning:`` names known backbones and samplers, and its seed is its own: one line otherwise."""
    if not TUNING:
        return
    for key, known in (("models", BACKBONES), ("samplers", SAMPLERS)):
        unknown = sorted(set(TUNING.get(key, known)) - set(known))
        if unknown:
            raise ValueError(f"config: tuning.{key}: {unknown[0]!r} is not in {key} ({', '.join(known)})")
    for where, seed in tuning_seed_clashes().items():
        if seed == TUNING["seed"]:
            raise ValueError(f"config: tuning.seed: {seed} is also {where}: tuning must not see those samples; "
                             "choose another seed")


check_tuning()


def tuning_path(model, sampler, name):
    return f"{RESULTS}/tuning/{model}/{sampler}/{name}"


def family_options(wildcards):
    """``--method …`` of a family's base setting (tokencache tune varies its search space's knobs)."""
    return setting_options(*spec_of(FAMILIES[wildcards.family]), wildcards)


def family_inputs(wildcards):
    """Files a family's tuning needs beyond the checkpoint (its calibration, the VAE)."""
    return setting_inputs(*spec_of(FAMILIES[wildcards.family]), wildcards)


TUNING_SAMPLE_OPTIONS = (f"--seed {TUNING.get('seed', 0)} --num-samples {TUNING.get('num_samples', 1)} "
                         f"--batch-size {min(TUNING.get('num_samples', 1), config['batch_size'])} "
                         f"--device {config['device']}")


rule tune_reference:
    # the uncached images of the tuning seed: what every family's points are compared with
    input:
        ckpt=checkpoint_path,
        extra=lambda w: vae_inputs(w.model),
    output:
        npz=temp(tuning_path("{model}", "{sampler}", "reference.npz")),
        meta=temp(tuning_path("{model}", "{sampler}", "reference.json")),
    log:
        f"{RESULTS}/logs/tune/{{model}}/{{sampler}}/reference.log",
    params:
        opts=sampler_options,
        model_set=model_set_options,
        sample=TUNING_SAMPLE_OPTIONS,
    threads: THREADS
    resources:
        gpu=1 if config["device"] == "cuda" else 0,
    shell:
        "tokencache sample --checkpoint {input.ckpt}{params.model_set} --sampler {wildcards.sampler} {params.opts} "
        "{params.sample} --threads {threads} --out {output.npz} --quiet --json > {log} 2>&1"


rule tune:
    input:
        ckpt=checkpoint_path,
        reference=rules.tune_reference.output.npz,
        reference_meta=rules.tune_reference.output.meta,
        extra=family_inputs,
    output:
        record=tuning_path("{model}", "{sampler}", "methods/{family}.json"),
        provenance=tuning_path("{model}", "{sampler}", "methods/{family}.provenance.json"),
    log:
        f"{RESULTS}/logs/tune/{{model}}/{{sampler}}/{{family}}.log",
    params:
        opts=sampler_options,
        model_set=model_set_options,
        method=family_options,
        sample=TUNING_SAMPLE_OPTIONS,
    threads: THREADS
    resources:
        gpu=1 if config["device"] == "cuda" else 0,
    shell:
        "tokencache tune {params.method} --label {wildcards.family} --checkpoint {input.ckpt}{params.model_set} "
        "--sampler {wildcards.sampler} {params.opts} {params.sample} --reference {input.reference} "
        "--threads {threads} --out {output.record} --quiet > {log} 2>&1"


#: which front points are evaluated (tokencache.tuning.evaluated_points): all, or those a budget can pick
FRONT_SELECTION = {"evaluate": TUNING.get("evaluate", "budgets"), "budgets": TUNING.get("budgets", [1.5, 2, 2.5, 3, 4])}


checkpoint select_front:
    # each family's non-dominated points on the tuning seed; the evaluation runs are read from here
    input:
        records=lambda w: [tuning_path(w.model, w.sampler, f"methods/{family}.json")
                           for m, s, family in tuned_families() if (m, s) == (w.model, w.sampler)],
    output:
        front=tuning_path("{model}", "{sampler}", "front.json"),
    run:
        from tokencache.io import write_atomic
        from tokencache.tuning import front_record

        records = [json.loads(open(path).read()) for path in input.records]
        write_atomic(output.front, front_record(records, **FRONT_SELECTION), format="json")


def front_files():
    return [tuning_path(m, s, "front.json") for m, s in tuned_pairs()]


def tuned_run_dirs(wildcards=None):
    """Run folders of every front point (each pair's front file must exist: a checkpoint's output)."""
    from tokencache.tuning import front_labels

    dirs = []
    for m, s in tuned_pairs():
        front = checkpoints.select_front.get(model=m, sampler=s).output.front
        with open(front) as f:
            dirs += [f"{RESULTS}/runs/{m}/{s}/{label}" for label in front_labels(json.load(f))]
    return dirs


def budget_outputs():
    """The budget tables (budgets.py), when the config tunes anything."""
    if not TUNING:
        return {}
    names = {"csv": "budgets.csv", "md": "budgets.md", "quality_csv": "quality_budgets.csv",
             "quality_md": "quality_budgets.md", "headline": "headline.md"}
    return {key: f"{RESULTS}/tables/{name}" for key, name in names.items()}


#: the MACs speed-up at which the sample grid shows each tuned family (its best front point there)
GRID_SPEEDUP = 2.0


def grid_front_dirs(wildcards=None):
    """One run per tuned family for the sample grid: its front point with the best tuning PSNR at
    ≥ GRID_SPEEDUP× (else its fastest), chosen from the tuning files like the front itself."""
    dirs = []
    for m, s in tuned_pairs():
        with open(checkpoints.select_front.get(model=m, sampler=s).output.front) as f:
            front = json.load(f)
        for family in front["methods"].values():
            points = [p for p in family["points"] if p["evaluate"]]
            if not points:  # no point reaches a budget (or every one was skipped): nothing to show
                continue
            fast = [p for p in points if p["macs_speedup"] >= GRID_SPEEDUP]
            best = max(fast, key=lambda p: p["psnr_to_full"]) if fast else max(points, key=lambda p: p["macs_speedup"])
            dirs.append(f"{RESULTS}/runs/{m}/{s}/{best['label']}")
    return dirs
