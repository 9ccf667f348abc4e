# Download stage, for configs on official weights (ImageNet; config/paper.yaml): the official
# checkpoints, the Stable Diffusion VAE, ADM's reference batch and the Inception-v3 weights, each
# into DOWNLOADS (shared by configs) with an atomic write and a checksum check where one is known.
# Then the evaluation with ADM's Inception features replaces the testbed's digits evaluation.
# Downloads are local rules: on a cluster they run on the submit host, which has internet.
# With a mirror (`downloads_base_url:`, or the rehearsal's local server: rehearsal.smk) every rule
# fetches from it instead, checked against its manifest.json ($TOKENCACHE_MIRROR, read at job time).
import os
import re
from pathlib import Path

localrules:
    download_checkpoint,
    download_vae,


def fetch_atomic(url, target, sha256=None):
    """Download ``url`` to ``target``; return (the URL used, the file's sha256).

    :func:`tokencache.mirror.fetch`: atomic (:func:`tokencache.io.write_atomic`), a transfer cut short
    retried, then one line naming the URL. ``sha256``: the full digest, or the 8+ hex digits that
    torch.hub puts in file names; a mismatch leaves no file. With a mirror set ($TOKENCACHE_MIRROR)
    the file comes from the mirror and is checked against the mirror's manifest instead.
    """
    from tokencache.mirror import fetch, mirror_source

    url, sha256 = mirror_source(url, sha256)
    return url, fetch(url, target, sha256)


def download_source():
    """Where the downloads come from, as a rule parameter: the official URLs, a mirror's URL, or the
    rehearsal's recipe (seed, stand-in widths, reference size). A change of it re-runs the downloads
    (Snakemake's params trigger), so stand-ins of another recipe are never used in their place."""
    if config.get("rehearsal") is not None:
        model_sets = {p: spec.get("model_set", {}) for p, spec in sorted(config["backbones"].items())}
        return f"rehearsal {sorted(config['rehearsal'].items())} {model_sets}"
    return config.get("downloads_base_url") or "official"


def official_files():
    """Names of the official checkpoint files the config's backbones use (see backbone_checkpoint)."""
    paths = [backbone_checkpoint(preset) for preset in BACKBONES]
    return [os.path.basename(p) for p in paths if p and p.startswith(f"{DOWNLOADS}/")]


rule download_checkpoint:
    output:
        ckpt=f"{DOWNLOADS}/{{filename}}",
    wildcard_constraints:
        filename="|".join(re.escape(f) for f in official_files()) or "no-official-checkpoint",
    log:
        f"{RESULTS}/logs/download/{{filename}}.log",
    params:
        source=download_source(),
    retries: 2
    shell:
        # `tokencache download`: atomic write, the published sha256 checked where one exists; from the
        # mirror in $TOKENCACHE_MIRROR when set, checked against its manifest
        "tokencache download {wildcards.filename} --dir {DOWNLOADS} --quiet --json > {log} 2>&1"


rule download_vae:
    # diffusers keeps the VAE in the Hugging Face cache (HF_HOME); sampling jobs find it there
    output:
        marker=f"{DOWNLOADS}/vae-ema.json",
    log:
        f"{RESULTS}/logs/download/vae-ema.log",
    params:
        source=download_source(),
    retries: 2
    run:
        from tokencache.io import write_atomic
        from tokencache.mirror import mirror_url
        from tokencache.models.vae import VAE_REPOS, download_vae, load_vae

        mirror = mirror_url()
        if mirror is None:
            load_vae("ema", "cpu")
            write_atomic(output.marker, {"vae": "ema", "repo": VAE_REPOS["ema"]})
        else:  # huggingface_hub pointed at the mirror, each file checked against its manifest
            digests = download_vae("ema", endpoint=mirror)
            write_atomic(output.marker, {"vae": "ema", "repo": VAE_REPOS["ema"], "mirror": mirror, "sha256": digests})


if FEATURES == "inception":

    localrules:
        download_reference,
        download_inception,

    REFERENCE_FILE = f"{DOWNLOADS}/{os.path.basename(config['reference']['url'])}"

    def inception_url():
        """torch-fidelity's Inception-v3 weights (the 2015 TF graph ADM's evaluator uses)."""
        import tokencache  # noqa: F401  (its torchvision fix must come before torch-fidelity)
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        return URL_INCEPTION_V3

    rule download_reference:
        output:
            ref=REFERENCE_FILE,
        params:
            url=config["reference"]["url"],
            sha256=config["reference"].get("sha256"),
            source=download_source(),
        log:
            f"{RESULTS}/logs/download/reference.log",
        retries: 2
        run:
            from tokencache.io import write_atomic

            url, digest = fetch_atomic(params.url, output.ref, params.sha256)
            write_atomic(log[0], f"{url} → {output.ref}\nsha256 {digest}\n")

    rule download_inception:
        output:
            weights=f"{DOWNLOADS}/{os.path.basename(inception_url())}",
        params:
            url=inception_url(),
            source=download_source(),
        log:
            f"{RESULTS}/logs/download/inception.log",
        retries: 2
        run:
            # the file name carries the first hex digits of its sha256 (torch.hub's convention)
            prefix = re.search(r"-([a-f0-9]{8,})\.", os.path.basename(output.weights))
            from tokencache.io import write_atomic

            url, digest = fetch_atomic(params.url, output.weights, prefix.group(1) if prefix else None)
            write_atomic(log[0], f"{url} → {output.weights}\nsha256 {digest}\n")

    rule reference_features:
        # the reference images' Inception features, extracted once for every evaluation (ADM's batch:
        # 10,000 images, which each evaluation would otherwise run through Inception again)
        input:
            ref=REFERENCE_FILE,
            weights=rules.download_inception.output.weights,
        output:
            features=f"{RESULTS}/reference/inception_features.npz",
        log:
            f"{RESULTS}/logs/evaluate/reference_features.log",
        params:
            batch=config.get("eval_batch_size", 64),
            device=config["device"],
        threads: THREADS
        resources:
            gpu=1 if config["device"] == "cuda" else 0,
        shell:
            "tokencache reference-features {input.ref} --features inception --weights {input.weights} "
            "--batch-size {params.batch} --device {params.device} --threads {threads} --out {output.features} "
            "--quiet --json > {log} 2>&1"

    rule evaluate_inception:
        # ADM's definitions on Inception features against the downloaded reference batch; in its own
        # process (50,000 images do not belong in the workflow's process) and on the GPU
        input:
            npz=f"{RESULTS}/runs/{{model}}/{{sampler}}/{{method}}/samples.npz",
            ref=REFERENCE_FILE,
            weights=rules.download_inception.output.weights,
            ref_features=rules.reference_features.output.features,
            full=full_run,
        output:
            metrics=f"{RESULTS}/runs/{{model}}/{{sampler}}/{{method}}/metrics.json",
            boot=f"{RESULTS}/runs/{{model}}/{{sampler}}/{{method}}/metrics.bootstrap.npz",
            provenance=f"{RESULTS}/runs/{{model}}/{{sampler}}/{{method}}/metrics.provenance.json",
        log:
            f"{RESULTS}/logs/evaluate/{{model}}/{{sampler}}/{{method}}.log",
        params:
            fidelity=lambda w, input: f"--fidelity-to {input.full}" if input.full else "",
            batch=config.get("eval_batch_size", 64),
            device=config["device"],
            resamples=BOOTSTRAP["resamples"],
            seed=BOOTSTRAP["seed"],
        threads: THREADS
        resources:
            gpu=1 if config["device"] == "cuda" else 0,
        run:
            shell(
                "tokencache evaluate {input.npz} --reference {input.ref} --features inception "
                "--weights {input.weights} --reference-features {input.ref_features} {params.fidelity} "
                "--batch-size {params.batch} --device {params.device} "
                "--bootstrap {params.resamples} --bootstrap-seed {params.seed} --threads {threads} "
                "--out {output.metrics} --quiet --json > {log} 2>&1"
            )
            from tokencache.results import split_file

            # metrics.json split in the workflow's process (a Python start-up saved per run): deterministic,
            # and the machine, timings and absolute paths in metrics.provenance.json (tokencache/results.py)
            split_file(output.metrics, RESULTS)

    ruleorder: evaluate_inception > evaluate
