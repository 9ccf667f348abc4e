# Downloads through a mirror, and the rehearsal of the download stage without the internet.
#
# `downloads_base_url: URL` (a mirror of the official files, with a manifest.json of their sha256):
# every download rule (download.smk) fetches URL/<official file name> and checks it against the
# manifest; the VAE comes through huggingface_hub pointed at URL (HF_ENDPOINT), and the jobs then
# load it from the Hugging Face cache without contacting the hub (HF_HUB_OFFLINE=1).
#
# `rehearsal: {seed: N}`: the mirror is made here. Before the first job (onstart) the stand-ins of
# every downloaded file (tokencache/standins.py: the official formats, random weights from the seed,
# the backbones' `model_set` widths) are written into RESULTS/internet/ unless already there, and a
# local HTTP server on 127.0.0.1 serves that folder as the mirror; it stops when the run ends
# (onsuccess, onerror, or the process's exit). Dry runs start nothing. The downloads are local
# rules, so on a cluster they run on the submit host, where the server is.
import atexit
import os

MIRROR_ENV = "TOKENCACHE_MIRROR"  # tokencache.mirror.MIRROR_ENV (not imported: parsing stays light)
REHEARSAL = config.get("rehearsal")
DOWNLOADS_BASE_URL = config.get("downloads_base_url")
#: the folder that plays the internet in a rehearsal: the stand-ins and their manifest.json
INTERNET = f"{RESULTS}/internet"


def check_rehearsal():
    """A rehearsal keeps every stand-in inside its results folder (never where real files go), and
    its reference batch has the name of the stand-in's. One line each."""
    if REHEARSAL is None:
        return
    if DOWNLOADS_BASE_URL:
        raise ValueError("config: rehearsal and downloads_base_url exclude each other (a rehearsal serves its own "
                         "mirror): remove one")
    results = os.path.abspath(RESULTS) + os.sep
    if not os.path.abspath(DOWNLOADS).startswith(results):
        raise ValueError(f"config: downloads: {DOWNLOADS} is outside {RESULTS}: a rehearsal's stand-ins must not take "
                         f"the official files' place; set downloads: {RESULTS}/downloads")
    if FEATURES == "inception":
        from tokencache.standins import REFERENCE_NAME

        name = os.path.basename(config["reference"]["url"])
        if name != REFERENCE_NAME:
            raise ValueError(f"config: reference.url: the rehearsal's stand-in reference batch is {REFERENCE_NAME}, "
                             f"not {name}: keep ADM's URL")


check_rehearsal()

#: the title line of every table, plot and report of a rehearsal: its numbers come from random stand-ins
STAND_IN_BANNER = ("REHEARSAL on stand-in weights (random, made from a seed): these numbers are not results"
                   if REHEARSAL is not None else "")

if REHEARSAL is not None:
    # the jobs find the stand-in VAE in the rehearsal's own Hugging Face cache, never in the user's
    os.environ["HF_HUB_CACHE"] = os.path.abspath(f"{RESULTS}/hf-cache")
if REHEARSAL is not None or DOWNLOADS_BASE_URL:
    os.environ["HF_HUB_OFFLINE"] = "1"  # jobs load the VAE that download_vae fetched from the mirror
if DOWNLOADS_BASE_URL:
    os.environ[MIRROR_ENV] = DOWNLOADS_BASE_URL.rstrip("/")


def rehearsal_model_sets():
    """Preset → constructor overrides of its stand-in checkpoint: the backbone's ``model_set``."""
    return {preset: dict(spec.get("model_set") or {}) for preset, spec in config["backbones"].items()
            if spec.get("checkpoint") and spec.get("model_set")}


def make_standins():
    """Write the stand-ins into INTERNET unless a manifest there was built with the same recipe."""
    import json
    import sys

    from tokencache.standins import DEFAULT_REFERENCE_IMAGES, build_standins, standins_recipe

    seed = int(REHEARSAL.get("seed", 0))
    count = int(REHEARSAL.get("reference_images", DEFAULT_REFERENCE_IMAGES))
    model_sets = rehearsal_model_sets()
    manifest_path = f"{INTERNET}/manifest.json"
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        recipe = standins_recipe(manifest)
        if (recipe["seed"] == seed and recipe["reference_images"] == count
                and all(recipe["model_sets"].get(p) == m for p, m in model_sets.items())
                and all(os.path.isfile(f"{INTERNET}/{name}") for name in manifest["files"])):
            return
    print(f"rehearsal: writing stand-ins (seed {seed}) into {INTERNET}", file=sys.stderr)
    build_standins(INTERNET, seed=seed, model_sets=model_sets, reference_count=count)


_REHEARSAL_SERVER = []


def start_rehearsal():
    """onstart: stand-ins, then the mirror server; its URL goes to the download rules through
    $TOKENCACHE_MIRROR (shell jobs inherit the environment, ``run:`` jobs read it)."""
    if REHEARSAL is None or _REHEARSAL_SERVER:
        return
    import sys

    from tokencache.mirror import MirrorServer

    make_standins()
    server = MirrorServer(INTERNET)
    url = server.start()
    _REHEARSAL_SERVER.append(server)
    atexit.register(stop_rehearsal)  # a run that ends without onsuccess/onerror still closes the socket
    os.environ[MIRROR_ENV] = url
    print(f"rehearsal: serving {INTERNET} at {url}", file=sys.stderr)


def stop_rehearsal():
    """onsuccess / onerror / exit: stop the mirror server (idempotent)."""
    while _REHEARSAL_SERVER:
        _REHEARSAL_SERVER.pop().stop()
        os.environ.pop(MIRROR_ENV, None)
