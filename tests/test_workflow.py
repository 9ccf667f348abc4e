"""The Snakemake workflow: the smoke config end to end, the paper config's DAG, and bad configs.

The smoke run writes to ``results/smoke-test-<pid>/`` (``--config name=…``), which is removed
afterwards; it adds one TokenCache ablation label (DiT only) so that the ablation table has rows.
It takes about 2 minutes on a 2-core CPU (the whole DAG: backbones, evaluator, routers,
predictors, 15 runs, tables, plots, report).
"""
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
SMOKE = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
ABLATION = {"abl-random": {"method": "tokencache:predictor=auto,token_choice=random", "models": ["DiT-digits"]}}
#: a user's own method (baselines/README.md's first example) run beside the built-ins
PLUGIN_RUN = {"every-other": {"method": "every-other:interval=2", "models": ["DiT-digits"]}}
PLOTS = ["pareto_macs", "pareto_latency", "macs_vs_fid", "token_fraction", "calibration", "tuning", "samples_grid"]

#: every test here but two runs Snakemake (5-180 s each on a busy 2-core machine; the smoke run is a
#: module fixture): the whole file is outside the inner loop, `pytest -m "not slow"`
pytestmark = pytest.mark.slow


def script(name: str):
    """A module of workflow/scripts/ (conftest.workflow_script)."""
    from conftest import workflow_script

    return workflow_script(name)


def snakemake(*args: str, timeout: float = 60, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``snakemake *args`` from the repository root (or ``cwd``); one torch thread per job; output as text."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run([SNAKEMAKE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def expected_runs(results: Path = None) -> set[tuple[str, str, str]]:
    """(model id, sampler, label) of every run of the smoke config plus the ablation label, and the
    tuned points each front file of ``results`` marks for evaluation."""
    import json

    runs = set()
    for label, spec in {**SMOKE["methods"], **PLUGIN_RUN, **ABLATION}.items():
        for model in spec.get("models", SMOKE["backbones"]):
            for sampler in spec.get("samplers", SMOKE["samplers"]):
                runs.add((model.replace("/", "_"), sampler, label))
    for front in sorted(results.glob("tuning/*/*/front.json")) if results else []:
        record = json.loads(front.read_text())
        runs |= {(front.parts[-3], front.parts[-2], p["label"]) for family in record["methods"].values()
                 for p in family["points"] if p["evaluate"]}
    return runs


def plugin_config(folder: Path) -> Path:
    """The smoke config as a user with their own method writes it: a plugin folder beside the
    config file (outside the repository), named relative to it, and the method in the runs."""
    from conftest import readme_examples

    examples, blocks = readme_examples()
    plugins = folder / "my-methods"
    plugins.mkdir(parents=True, exist_ok=True)
    (plugins / "every_other.py").write_text(next(code for code in blocks if '"every-other"' in code))
    config = {**SMOKE, "plugins": ["my-methods"], "methods": {**SMOKE["methods"], **PLUGIN_RUN}}
    path = folder / "smoke-with-plugin.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """Run the smoke workflow once for this module, with a plugin method from a folder outside the
    repository; yield its results folder; remove it."""
    name = f"smoke-test-{os.getpid()}"
    results = ROOT / "results" / name
    config = plugin_config(tmp_path_factory.mktemp("user"))
    try:
        done = snakemake("--cores", "2", "--configfile", str(config), "--config", f"name={name}",
                         f"methods={ABLATION}", "ablation=['abl-random']", timeout=900)
        assert done.returncode == 0, done.stderr[-4000:]
        yield name, results
    finally:
        shutil.rmtree(results, ignore_errors=True)


def test_smoke_tables(smoke_run):
    _, results = smoke_run
    table = pd.read_csv(results / "tables" / "main.csv")
    assert set(zip(table.model, table.sampler, table.method)) == expected_runs(results)
    assert len(table) == len(expected_runs(results)) > len(expected_runs())
    assert all(math.isfinite(v) for v in table.fid)
    # every metric carries its bootstrap interval, every cached run its paired difference from full
    for metric in ("fid", "sfid", "inception_score", "precision", "recall", "kid", "class_consistency"):
        assert (table[f"{metric}_lo"] <= table[metric] + 1e-9).all() and (table[metric] <= table[f"{metric}_hi"] + 1e-9).all()
    cached = table[table.method != "full"]
    assert cached.d_fid.notna().all() and cached.d_fid_lo.notna().all() and cached.d_kid_hi.notna().all()
    assert table[table.method == "full"].d_fid.eq(0).all()
    assert cached.psnr_to_full.map(math.isfinite).all()  # identical smoke images: capped, not inf
    assert (table.bootstrap_resamples == SMOKE["bootstrap"]["resamples"]).all()
    assert (table.macs_speedup > 0).all()
    assert table.loc[table.method == "full", "macs_speedup"].eq(1.0).all()
    assert set(table.loc[table.method == "full", "role"]) == {"reference"}
    assert set(table.loc[table.method == "steps3", "role"]) == {"fewer-steps"}
    # the digits testbed matches no published number: the reported columns exist and stay empty
    assert table.reported_fid.isna().all() and table.reported_source.isna().all()
    assert (results / "tables" / "main.md").read_text().count("\n") == len(table) + 2
    # measured time is volatile: in the latency table, not in the main table a rerun reproduces
    assert not {"latency_s_per_image", "speedup", "seconds"} & set(table.columns)
    latency = pd.read_csv(results / "tables" / "latency.csv")
    assert set(zip(latency.model, latency.sampler, latency.method)) == expected_runs(results)
    assert (latency.seconds > 0).all() and latency.loc[latency.role == "reference", "speedup"].eq(1.0).all()

    ablation = pd.read_csv(results / "tables" / "ablation.csv")
    assert list(ablation.method) == ["tokencache", "abl-random"]  # the default first, then the ablation
    assert list(ablation.token_choice) == ["predictor", "random"]
    assert list(ablation.varied) == ["default", "token_choice=random"]
    assert set(ablation.model) == {"DiT-digits"}
    assert all(math.isfinite(v) for v in ablation.fid)


def test_smoke_plots_and_report(smoke_run):
    """Plots are PNGs; the run ended by writing the HTML report (under the name given by --config,
    whose outputs the inner report call found only because the merged config was passed on)."""
    name, results = smoke_run
    for plot in PLOTS:
        data = (results / "plots" / f"{plot}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, plot
    assert not list((results / "plots").glob(".*.part"))  # atomic writes left no temporary file

    assert not list(results.glob(".report*"))
    html = (results / "report.html").read_text(errors="replace")
    for item in [f"{p}.png" for p in PLOTS] + ["main.csv", "ablation.csv", "budgets.csv", "quality_budgets.csv"]:
        assert item in html, item


def test_every_table_row_is_in_every_plot(smoke_run, tmp_path):
    """pareto_psnr lost the run whose mean PSNR was inf; now every row of the table is a point of
    each speed/quality figure (the figures' data, as plots.py drew them)."""
    _, results = smoke_run
    plots = script("plots")
    table = pd.read_csv(results / "tables" / "main.csv")
    runs = sorted(str(p) for p in (results / "runs").glob("*/*/*/run.json"))
    names = ["pareto_macs", "pareto_latency", "macs_vs_fid", "pareto_psnr", "token_fraction"]
    data = plots.main(str(results / "tables" / "main.csv"), runs, [], {n: str(tmp_path / f"{n}.png") for n in names},
                      latency_csv=str(results / "tables" / "latency.csv"))
    rows = set(zip(table.model, table.sampler, table.method))
    for name in ("pareto_macs", "pareto_latency", "macs_vs_fid", "pareto_psnr"):
        drawn = data[name]
        assert set(zip(drawn.model, drawn.sampler, drawn.label)) == rows, name
        assert drawn.psnr_to_full.notna().all() if name == "pareto_psnr" else True


def test_no_ablation_runs_table(smoke_run, tmp_path):
    """Without ablation labels the ablation table says so (tables.py on the smoke run's files)."""
    _, results = smoke_run
    tables = script("tables")
    runs = sorted(str(p) for p in (results / "runs").glob("*/*/*/run.json"))
    out = {k: str(tmp_path / f"{k}.out") for k in ("csv", "md", "tex", "ablation_csv", "ablation_md")}
    tables.main([r.replace("run.json", "metrics.json") for r in runs], runs, str(ROOT / "config" / "reported.yaml"),
                [], out)
    assert Path(out["ablation_md"]).read_text().startswith("No ablation runs were configured")
    assert pd.read_csv(out["ablation_csv"]).columns.tolist() == ["note"]


def test_budget_tables_of_the_tuned_fronts(smoke_run):
    """The tuning stage ran on the tuning seed only, its evaluated points are runs, the budget tables name them."""
    import json

    _, results = smoke_run
    front = json.loads((results / "tuning" / "DiT-digits" / "ddim5" / "front.json").read_text())
    assert front["seed"] == SMOKE["tuning"]["seed"] != SMOKE["seed"]
    assert set(front["methods"]) == set(SMOKE["tuning"]["methods"])
    assert not (results / "tuning" / "MDTv2-digits").exists()  # tuning.models: DiT only
    for family in front["methods"].values():
        assert any(p["front"] for p in family["points"]) and all(p["front"] for p in family["points"] if p["evaluate"])
    budgets = pd.read_csv(results / "tables" / "budgets.csv")
    table = pd.read_csv(results / "tables" / "main.csv")
    assert set(budgets.family) <= set(SMOKE["tuning"]["methods"])
    assert set(budgets.label.dropna()) <= set(table.method[table.method.str.contains("@")])
    assert (results / "tables" / "headline.md").read_text().strip()


def test_the_selection_never_sees_an_evaluation_seed_image(smoke_run, tmp_path):
    """Every evaluation-seed image of a copy of the smoke results replaced by noise, the fronts
    selected again: the same bytes (the selection reads the tuning seed's files alone)."""
    import numpy as np

    name, first = smoke_run
    moved = f"{name}-moved"
    copy = ROOT / "results" / moved
    shutil.copytree(first, copy, symlinks=True)
    try:
        fronts = {path: path.read_bytes() for path in copy.glob("tuning/*/*/front.json")}
        assert fronts
        rng = np.random.default_rng(0)
        replaced = 0
        for npz in copy.glob("runs/*/*/*/samples.npz"):
            with np.load(npz) as data:
                images, labels = data["arr_0"], data["arr_1"]
            np.savez(npz, arr_0=rng.integers(0, 256, images.shape, dtype=np.uint8), arr_1=labels)
            replaced += 1
        assert replaced == len(expected_runs(first))
        config = plugin_config(tmp_path / "user")
        done = snakemake("--cores", "1", "--configfile", str(config), "--config", f"name={moved}",
                         f"methods={ABLATION}", "ablation=['abl-random']", "report=false", "--forcerun", "select_front",
                         "--", *[str(path.relative_to(ROOT)) for path in fronts], timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        assert "select_front" in done.stdout + done.stderr  # selected again, not skipped as up to date
        for path, data in fronts.items():
            assert path.read_bytes() == data, path
    finally:
        shutil.rmtree(copy, ignore_errors=True)


@pytest.mark.slow
def test_rerun_elsewhere_rewrites_only_volatile_files(smoke_run, tmp_path):
    """The smoke workflow again, from a copy of the workflow in another folder and under another
    name: every deterministic file (tokencache.results) is byte-identical to the first run's, and
    only volatile files differ; none names the folder it was written in; compare says identical."""
    from tokencache.compare import compare_results
    from tokencache.results import deterministic_files, differing_files, is_volatile, result_files

    _, first = smoke_run
    checkout = tmp_path / "elsewhere"
    for name in ("workflow", "config", "profiles"):
        shutil.copytree(ROOT / name, checkout / name, symlinks=True)
    shutil.copy(ROOT / "Snakefile", checkout / "Snakefile")
    config = plugin_config(tmp_path / "user")  # the first run's config, its plugin folder elsewhere too
    done = snakemake("--cores", "2", "--configfile", str(config), "--config", "name=rerun",
                     f"methods={ABLATION}", "ablation=['abl-random']", "report=false", timeout=900, cwd=checkout)
    assert done.returncode == 0, done.stderr[-4000:]
    second = checkout / "results" / "rerun"

    kept = deterministic_files(first)
    assert kept == deterministic_files(second)
    assert {"tables/main.csv", "tables/main.md", "tables/main.tex", "tables/ablation.csv", "plots/pareto_macs.png",
            "runs/DiT-digits/ddim5/l2c/run.json", "runs/DiT-digits/ddim5/l2c/metrics.json"} <= set(kept)
    files = differing_files(first, second)
    assert files["differ"] and all(is_volatile(f) for f in files["differ"]), [f for f in files["differ"]
                                                                              if not is_volatile(f)]
    assert all(is_volatile(f) for f in files["only_a"] + files["only_b"])  # report.html: only the first wrote one
    volatile = [f for f in result_files(second) if is_volatile(f)]
    for run in {f.rsplit("/", 1)[0] for f in kept if f.endswith("/run.json")}:
        assert f"{run}/run.provenance.json" in volatile and f"{run}/metrics.provenance.json" in volatile
    assert {"tables/latency.csv", "plots/pareto_latency.png"} <= set(volatile)

    # no deterministic file names the folder it was written in, nor its results folder
    for root, folder in ((first, ROOT), (second, checkout)):
        for name in kept:
            data = (root / name).read_bytes()
            assert str(folder).encode() not in data and f"results/{root.name}".encode() not in data, name
    run = (second / "runs/DiT-digits/ddim5/l2c/run.json").read_text()
    assert '"router": "calibration/DiT-digits/ddim5/l2c.pt"' in run and '"checkpoint": "backbones/DiT-digits.pt"' in run

    report = compare_results(first, second)
    assert report["identical"] and report["agree"]
    assert report["samples"]["runs"] == len(expected_runs(first)) and report["samples"]["images_differing"] == 0


def test_a_banner_titles_every_table_and_figure(smoke_run, tmp_path):
    """A rehearsal's banner ("stand-in weights … not results") heads every table it writes (CSV: a
    first note column; Markdown: a first bold line; LaTeX: the caption) and every figure."""
    import matplotlib.pyplot as plt

    _, results = smoke_run
    tables, plots = script("tables"), script("plots")
    banner = "REHEARSAL on stand-in weights: not results"
    runs = sorted(str(p) for p in (results / "runs").glob("*/*/*/run.json"))
    out = {k: str(tmp_path / f"{k}.out") for k in ("csv", "md", "tex", "ablation_csv", "ablation_md", "latency_csv",
                                                    "latency_md")}
    tables.main([r.replace("run.json", "metrics.json") for r in runs], runs, str(ROOT / "config" / "reported.yaml"),
                ["abl-random"], out, banner=banner)
    for key in ("csv", "ablation_csv", "latency_csv"):
        table = pd.read_csv(out[key])
        assert table.columns[0] == "note" and (table.note == banner).all(), key
    for key in ("md", "ablation_md", "latency_md"):
        assert Path(out[key]).read_text().startswith(f"**{banner}**\n\n"), key
    assert f"\\caption{{{banner}}}" in Path(out["tex"]).read_text()
    fig = plt.figure()
    fig.suptitle("Speed-up vs FID")
    plots.with_banner(fig, banner)
    assert fig._suptitle.get_text() == f"{banner}\nSpeed-up vs FID"
    plt.close(fig)


def test_reported_fid_needs_backbone_sampler_and_guidance():
    tables = script("tables")
    entries = tables.load_reported(ROOT / "config" / "reported.yaml")
    dit = {"name": "DiT-XL/2", "family": "DiT", "input_size": 32}

    def reported(config, sampler, method, cfg_scale, steps):
        run = {"model_config": config, "request": {"cfg_scale": cfg_scale, "scale_pow": 4.0},
               "cache": {"method": method, "params": {}}, "steps": steps}
        return tables.reported_columns(entries, sampler, run)

    full = reported(dit, "ddpm250", "full", 1.5, 250)
    assert full["reported_fid"] == 2.27  # the verified number first, the secondary one listed after it
    assert full["reported_source"].startswith("2.27 DiT paper")
    assert "2.09 TokenCache v2 (unverified)" in full["reported_source"]
    assert reported(dit, "ddpm250", "steps", 1.5, 125)["reported_fid"] == 2.13
    assert reported(dit, "ddpm250", "steps", 1.5, 100)["reported_fid"] is None  # other step count
    assert reported(dit, "ddpm250", "full", 4.0, 250)["reported_fid"] is None  # other guidance
    assert reported({**dit, "input_size": 64}, "ddpm250", "full", 1.5, 250)["reported_fid"] is None  # 512 px
    assert reported({"name": "DiT-digits", "input_size": 8}, "ddim20", "full", 3.0, 20)["reported_fid"] is None


def test_pareto_front():
    import numpy as np

    plots = script("plots")
    speedup = np.array([1.0, 1.5, 2.0, 2.0, 3.0])
    fid = np.array([3.0, 3.5, 3.2, 4.0, 9.0])
    # (1.5, 3.5) is beaten by (2.0, 3.2) and (2.0, 4.0) by (2.0, 3.2): the rest form the front
    assert plots.pareto_front(speedup, fid, maximize_x=True).tolist() == [0, 2, 4]
    macs = 1 / speedup  # the same points on a cost axis (lower is better)
    assert sorted(plots.pareto_front(macs, fid, maximize_x=False).tolist()) == [0, 2, 4]


def bad_config(tmp_path, change) -> str:
    """The smoke config with one mistake, as a file."""
    config = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    change(config)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize("change, key, reason", [
    (lambda c: c["samplers"].update(foo={"cfg_scale": 2.0}), "samplers.foo", "unknown sampler 'foo'"),
    (lambda c: c["samplers"].update(ddim0={"cfg_scale": 2.0}), "samplers.ddim0", "unknown sampler 'ddim0'"),
    (lambda c: c["samplers"].update(ddim1={"cfg_scale": 2.0}), "samplers.ddim1", "needs at least 2 steps"),
    (lambda c: c["backbones"].update({"DiT-XXL/2": {"steps": 2}}), "backbones.DiT-XXL/2", "unknown model 'DiT-XXL/2'"),
    (lambda c: c["methods"].update(steps0={"method": "steps", "params": {"fraction": 0.1}}), "methods.steps0",
     "with sampler ddim5: sampler 'ddim1': needs at least 2 steps"),
    (lambda c: c["backbones"].update({"DiT-S/2": {"checkpoint": "shipped"}}), "backbones.DiT-S/2.checkpoint",
     "no shipped weights for 'DiT-S/2'"),
    (lambda c: c["backbones"]["DiT-digits"].update(checkpoint="nowhere.pt"), "backbones.DiT-digits.checkpoint",
     "nowhere.pt is not a file"),
    (lambda c: c["methods"].update(fora={"method": "nosuch"}), "methods.fora", "unknown method 'nosuch'"),
    (lambda c: c["methods"].update(mine={"method": "half-mlp"}), "methods.mine",
     "or load your plugin folder: `plugins:` in the workflow config, `--plugins DIR`, or $TOKENCACHE_PLUGINS"),
    (lambda c: c.update(plugins=["no-such-folder"]), "plugins", "folder 'no-such-folder' not found (looked in"),
    (lambda c: c["methods"].update(fora={"method": "fora", "params": {"interval": -1}}), "methods.fora",
     "interval must be in 1"),
    (lambda c: c.update(num_samples=-8), "num_samples", "-8 is less than the minimum of 1"),
    (lambda c: c["backbones"]["DiT-digits"].update(cfg_scale=3.0), "backbones.DiT-digits",
     "'checkpoint' is a dependency of 'cfg_scale'"),
], ids=["sampler-foo", "sampler-ddim0", "sampler-ddim1", "unknown-backbone", "steps-fraction-0", "shipped-unknown",
        "missing-checkpoint", "unknown-method", "unknown-method-hint", "missing-plugin-folder", "negative-parameter", "negative-num-samples",
        "guidance-on-trained-backbone"])
def test_bad_config_fails_with_one_line(tmp_path, change, key, reason):
    done = snakemake("-n", "--configfile", bad_config(tmp_path, change))
    assert done.returncode != 0
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("config: ")]
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith(f"config: {key}: ") and reason in lines[0], lines[0]


def test_paper_config_dag_without_network():
    """The paper config's DAG: downloads, GPU resources, MDT's own guidance, Inception evaluation."""
    done = snakemake("results/paper/runs/MDTv2-XL_2/ddim50/tokencache/metrics.json", "-n", "-p",
                     "--configfile", "config/paper.yaml", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    for rule in ("download_checkpoint", "download_vae", "download_reference", "download_inception",
                 "calibrate", "sample_shard", "merge_shards", "evaluate_inception"):
        assert f"rule {rule}:" in out, rule
    assert "rule train_backbone:" not in out and "rule evaluate:" not in out
    assert "tokencache download mdt_xl2_v2_ckpt.pt" in out
    assert "--checkpoint checkpoints/mdt_xl2_v2_ckpt.pt --sampler ddim50 --cfg-scale 3.8 --scale-pow 4.0" in out
    assert "--features inception" in out and "--device cuda" in out
    assert out.count("gpu=1") >= 50  # 50 shards of one run, each a GPU job
    several = snakemake("results/paper/runs/DiT-XL_2/ddim50/fora3/samples.npz", "-n", "-p", "--configfile",
                        "config/paper.yaml", "--config", "gpus_per_job=8", timeout=120)
    out = several.stdout + several.stderr
    assert several.returncode == 0 and "torchrun --standalone --nproc_per_node 8 -m tokencache sample" in out
    assert out.count("gpu=8") == 50


@pytest.mark.slow
def test_readme_states_the_paper_dag_that_snakemake_builds():
    """The job and run counts of the paper DAG that docs/paper-scale.md states are the ones `snakemake -n`
    prints (the README once said 1,471 jobs where Snakemake built 2,831)."""
    import re

    done = snakemake("-n", "--forceall", "--configfile", "config/paper.yaml", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", done.stdout + done.stderr, re.M))
    stated = re.search(r"snakemake -n --configfile config/paper\.yaml .*the DAG \(([\d,]+) jobs: (\d+) runs\)",
                       (ROOT / "docs" / "paper-scale.md").read_text())
    assert stated, "docs/paper-scale.md states the paper DAG's size next to `snakemake -n --configfile config/paper.yaml`"
    assert int(stated.group(1).replace(",", "")) == int(counts["total"])
    assert int(stated.group(2)) == int(counts["merge_shards"])


def test_default_config_with_config_keys_and_shipped_weights():
    """`--config key=value` changes the default config (it used to replace it), `report=false` is a
    boolean, and the default samples from the shipped weights: no backbone or evaluator training."""
    done = snakemake("-n", "-p", "--config", "report=false", "name=dry-default")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert "rule train_backbone:" not in out and "rule train_evaluator:" not in out
    assert "tokencache/weights/DiT-digits.pt" in out and "rule sample_shard:" in out


def bad_run(tmp_path, *config: str) -> subprocess.CompletedProcess:
    """A real (not dry) smoke run that must stop before any job, with one line starting "results: "."""
    done = snakemake("--cores", "1", "--configfile", "config/smoke.yaml", "--config", *config, "report=false")
    assert done.returncode != 0
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("results: ")]
    assert len(lines) == 1, done.stderr[-3000:]
    assert "Finished jobid" not in done.stdout + done.stderr  # not one job ran
    return lines[0]


def test_not_enough_disk_stops_before_any_job(tmp_path):
    name = f"disk-test-{os.getpid()}"
    try:
        line = bad_run(tmp_path, f"name={name}", "num_samples=1000000000000", "shard_size=1000000000000")
        assert "samples need about" in line and "are free on that disk" in line
        assert not (ROOT / "results" / name / "backbones").exists()
    finally:
        shutil.rmtree(ROOT / "results" / name, ignore_errors=True)


def test_read_only_results_folder_stops_before_any_job(tmp_path):
    name = f"ro-test-{os.getpid()}"
    folder = ROOT / "results" / name
    folder.mkdir(parents=True)
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            folder.rmdir()
            pytest.skip("root without chattr +i")
        undo = ["chattr", "-i", str(folder)]
    else:
        folder.chmod(0o555)
        undo = ["chmod", "755", str(folder)]
    try:
        assert "cannot write in" in bad_run(tmp_path, f"name={name}")
    finally:
        subprocess.run(undo, check=True)
        shutil.rmtree(folder, ignore_errors=True)


def test_after_kill_9_unlock_lets_the_same_command_run(tmp_path):
    """A killed Snakemake leaves its lock; the same command then stops naming --unlock (README: "After a
    crash or kill"), and after `snakemake --unlock` it runs. In a scratch folder: --unlock there cannot
    touch the locks of a workflow running in the repository."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    base = [SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"), "--configfile", str(ROOT / "config" / "smoke.yaml"),
            "--config", f"reported={ROOT / 'config' / 'reported.yaml'}", "report=false", "--cores", "1"]
    run = subprocess.Popen(base, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    locks = tmp_path / ".snakemake" / "locks"
    deadline = time.time() + 120
    while time.time() < deadline and not (locks.is_dir() and any(locks.iterdir())):
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert locks.is_dir() and any(locks.iterdir()), "the run never took its lock"
    until = ["--until", "train_backbone"]  # two 2-step trainings: the cheapest real jobs
    again = subprocess.run(base + until, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "--unlock" in again.stdout + again.stderr
    assert subprocess.run(base + ["--unlock"], cwd=tmp_path, env=env, capture_output=True, timeout=120).returncode == 0
    done = subprocess.run(base + until, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    readme = (ROOT / "README.md").read_text()
    assert "snakemake --unlock" in readme and "kill" in readme


def dag_jobs(configfile: str) -> tuple[dict, set]:
    """(job count per rule, {(rule, wildcards)}) of ``snakemake -n`` on a config."""
    import re

    done = snakemake("-n", "--forceall", "--configfile", configfile, timeout=300)  # the whole DAG, whatever exists
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    counts = {rule: int(n) for rule, n in re.findall(r"^(\w+)\s+(\d+)$", out, re.M) if rule != "total"}
    jobs = set(re.findall(r"^rule (\w+):\n(?:    .*\n)*?    wildcards: (.*)$", out, re.M))
    return counts, jobs


@pytest.mark.slow
def test_the_rehearsal_runs_every_rule_run_and_calibration_of_the_paper_config():
    """config/rehearsal.yaml runs what config/paper.yaml runs: every rule, every (backbone, sampler,
    method) run, every calibration and download, whatever the paper config gains later; it differs
    only in the number of sampling shards (fewer samples)."""
    paper_counts, paper_jobs = dag_jobs("config/paper.yaml")
    rehearsal_counts, rehearsal_jobs = dag_jobs("config/rehearsal.yaml")
    rehearsal = yaml.safe_load((ROOT / "config" / "rehearsal.yaml").read_text())
    assert set(paper_counts) <= set(rehearsal_counts), set(paper_counts) - set(rehearsal_counts)
    # the tuning stage is rehearsed on the backbones rehearsal.yaml's `tuning.models` names (one of two)
    tuned = [m.replace("/", "_") for m in rehearsal["tuning"]["models"]]
    tuning_rules = {"tune_reference", "tune", "select_front"}
    for rule, count in paper_counts.items():
        if rule in tuning_rules:
            assert 0 < rehearsal_counts[rule] == count * len(tuned) // 2, rule
        elif rule != "sample_shard":
            assert rehearsal_counts[rule] == count, rule
    per_run = {(rule, wildcards) for rule, wildcards in paper_jobs if rule != "sample_shard"
               and (rule not in tuning_rules or any(f"model={m}" in wildcards for m in tuned))}
    assert per_run and per_run <= rehearsal_jobs, sorted(per_run - rehearsal_jobs)[:5]
    assert rehearsal["overlay_of"] == "paper.yaml"
    assert not {"methods", "samplers"} & set(rehearsal), "the rehearsal inherits methods and samplers, never redefines them"
    assert set(rehearsal.get("backbones", {})) <= set(yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())["backbones"])
