"""Results folders: the deterministic/volatile split of job records, portable paths, the committed
results, and ``tokencache compare`` (the smoke workflow's rerun test is in test_workflow.py)."""
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from tokencache.cli import main
from tokencache.compare import compare_results, compare_table
from tokencache.results import (
    deterministic_files,
    is_volatile,
    join_record,
    portable_path,
    provenance_path,
    read_record,
    resolve_portable,
    result_files,
    split_record,
)
from tokencache.weights import shipped_path

ROOT = Path(__file__).resolve().parents[1]
#: the committed results of the default config (tuned) and of config/testbed-full.yaml (the hand-picked grid)
DEFAULT, FULL_GRID = ROOT / "results" / "digits", ROOT / "results" / "digits-full"
DIGITS = FULL_GRID
RUN = DIGITS / "runs" / "DiT-digits" / "ddim20" / "l2c"


def test_volatile_patterns():
    for name in ("runs/a/b/c/run.provenance.json", "runs/a/b/c/metrics.provenance.json", "tables/latency.csv",
                 "tables/latency.md", "plots/pareto_latency.png", "logs/stage_times.txt",
                 "logs/calibrate/DiT-digits/ddim20/l2c.log", "report.html"):
        assert is_volatile(name), name
    for name in ("runs/a/b/c/run.json", "runs/a/b/c/metrics.json", "tables/main.csv", "tables/main.md",
                 "tables/main.tex", "tables/ablation.csv", "plots/pareto_macs.png", "plots/pareto_psnr.png",
                 "calibration/DiT-digits/ddim20/l2c.log.jsonl", "tables/sweep_x_y_z.csv"):
        assert not is_volatile(name), name


def test_portable_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = Path("results/x")
    (root / "calibration").mkdir(parents=True)
    (root / "calibration" / "r.pt").write_bytes(b"")
    Path("checkpoints").mkdir()
    (Path("checkpoints") / "c.pt").write_bytes(b"")
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere.pt"
    elsewhere.write_bytes(b"")
    try:
        assert portable_path(str(shipped_path("DiT-digits")), root) == "shipped:DiT-digits"
        assert portable_path("results/x/calibration/r.pt", root) == "calibration/r.pt"
        assert portable_path(str(tmp_path / "results/x/calibration/r.pt"), root) == "calibration/r.pt"
        assert portable_path("checkpoints/c.pt", root) == "../../checkpoints/c.pt"
        assert portable_path(str(elsewhere), root) == elsewhere.name  # outside the working folder: its name
        assert portable_path("results/x/calibration/gone.pt", root) == "calibration/gone.pt"  # a path, not made yet
        for value in ("ema", "shipped:DiT-digits", None, 3):
            assert portable_path(value, root) == value
        assert resolve_portable("calibration/r.pt", root) == str(Path("results/x/calibration/r.pt"))
        assert resolve_portable("shipped:DiT-digits", root) == str(shipped_path("DiT-digits"))
    finally:
        elsewhere.unlink()


def test_split_keeps_everything_and_moves_what_varies(tmp_path, monkeypatch):
    """A job's whole record: split into the deterministic file and its provenance, joined back equal."""
    record = read_record(RUN / "run.json")
    assert record["seconds"] > 0 and record["provenance"]["cpu_model"] and "torch" in record
    record["request"]["checkpoint"] = str(shipped_path("DiT-digits"))  # as the job wrote it: absolute
    record["cache"]["params"]["router"] = str(DIGITS / "calibration/DiT-digits/ddim20/l2c.pt")
    deterministic, volatile = split_record(record, DIGITS)
    assert join_record(deterministic, volatile) == record
    text = json.dumps(deterministic)
    for word in ("seconds", "provenance", "load_average", "git_commit", "cpu_model", str(ROOT)):
        assert word not in text, word
    assert deterministic["request"]["checkpoint"] == "shipped:DiT-digits"
    assert deterministic["cache"]["params"]["router"] == "calibration/DiT-digits/ddim20/l2c.pt"
    assert volatile["paths"]["request.checkpoint"] == str(shipped_path("DiT-digits"))

    metrics = read_record(RUN / "metrics.json")
    metrics["reference"] = str(shipped_path("digits-reference"))  # as this checkout's job writes them
    metrics["extractor"]["weights"] = str(shipped_path("digits-evaluator"))
    deterministic, volatile = split_record(metrics, DIGITS)
    assert join_record(deterministic, volatile) == metrics
    assert "seconds" not in deterministic["bootstrap"] and volatile["bootstrap"]["seconds"] > 0
    assert deterministic["reference"] == "shipped:digits-reference"
    assert deterministic["extractor"]["weights"] == "shipped:digits-evaluator"


def test_a_shell_jobs_record_is_split_in_place(tmp_path):
    """``python -m tokencache.results RECORD RESULTS`` (the Inception evaluation's shell rule)."""
    from tokencache.results import main as split_main

    record = read_record(RUN / "metrics.json")
    path = tmp_path / "results" / "x" / "runs" / "m" / "s" / "l" / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record))
    assert split_main([str(path), str(tmp_path / "results" / "x")]) == 0
    assert "provenance" not in json.loads(path.read_text())
    assert read_record(path) == record
    with pytest.raises(SystemExit):
        split_main([str(tmp_path / "nothing.json"), str(tmp_path)])


@pytest.mark.parametrize("folder, config", [(DEFAULT, "config.yaml"), (FULL_GRID, "testbed-full.yaml")])
def test_committed_results_hold_nothing_volatile(folder, config):
    """The committed results in the new layout: one run per configured label and tuned front point,
    every run with its provenance beside it, and no deterministic file holding a machine, a time, a
    commit or an absolute path."""
    files = result_files(folder)
    runs = [f for f in files if f.endswith("/run.json")]
    assert len(runs) == configured_run_count(ROOT / "config" / config) + len(evaluated_points(folder))
    for run in runs:
        assert provenance_path(folder / run).is_file() and provenance_path(folder / run.replace("run.json",
                                                                                                 "metrics.json")).is_file()
    for name in deterministic_files(folder):
        if name.endswith((".json", ".jsonl", ".csv", ".md", ".tex")):
            text = (folder / name).read_text()
            for word in ('"seconds"', "load_average", "git_commit", "cpu_model", '"provenance"', str(ROOT),
                         f"results/{folder.name}", "latency_s_per_image"):
                assert word not in text, (name, word)
    latency = pd.read_csv(folder / "tables" / "latency.csv")
    assert len(latency) == len(runs) and latency.seconds.gt(0).all()


def configured_run_count(config_path) -> int:
    """Runs a config's ``methods`` ask for: every label on every backbone and sampler it allows."""
    import yaml

    config = yaml.safe_load(Path(config_path).read_text())
    count = 0
    for entry in config["methods"].values():
        models = entry.get("models", list(config["backbones"]))
        samplers = entry.get("samplers", list(config["samplers"]))
        count += len(models) * len(samplers)
    return count


def evaluated_points(folder) -> list[str]:
    """The tuned points a results folder's front files chose for evaluation."""
    labels = []
    for front in sorted(Path(folder).glob("tuning/*/*/front.json")):
        record = json.loads(front.read_text())
        labels += [p["label"] for family in record["methods"].values() for p in family["points"] if p["evaluate"]]
    return labels


def test_default_results_evaluate_only_what_the_tuning_chose():
    """results/digits: the tuned runs are exactly the front points chosen on the tuning seed, and the
    tuning seed is neither the evaluation seed nor a calibration seed of the default config."""
    import yaml

    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    tuned = {p.parent.name for p in DEFAULT.glob("runs/*/*/*@*/run.json")}
    assert tuned and tuned == set(evaluated_points(DEFAULT))
    seed = config["tuning"]["seed"]
    assert seed != config["seed"] and seed not in {c.get("seed") for c in config["calibration"].values()}
    for front in DEFAULT.glob("tuning/*/*/front.json"):
        assert json.loads(front.read_text())["seed"] == seed


def folders(tmp_path):
    """Two copies of the committed tables and one run (A, B)."""
    out = []
    for name in ("a", "b"):
        shutil.copytree(DIGITS / "tables", tmp_path / name / "tables")
        shutil.copytree(RUN, tmp_path / name / RUN.relative_to(DIGITS))
        out.append(tmp_path / name)
    return out


def plant(folder, row: dict, column: str, value) -> None:
    table = pd.read_csv(folder / "tables" / "main.csv")
    where = (table.model == row["model"]) & (table.sampler == row["sampler"]) & (table.method == row["method"])
    table.loc[where, column] = value
    (folder / "tables" / "main.csv").write_text(table.to_csv(index=False))


def test_compare_identical_and_a_planted_difference(tmp_path, capsys):
    a, b = folders(tmp_path)
    report = compare_results(a, b)
    assert report["identical"] and report["agree"]
    assert main(["compare", str(a), str(b)]) == 0
    assert "verdict: identical" in capsys.readouterr().out

    # a volatile file that differs does not matter
    (b / "tables" / "latency.csv").write_text("other machine\n")
    assert compare_results(a, b)["identical"]

    table = pd.read_csv(a / "tables" / "main.csv")
    row = table[(table.model == "DiT-digits") & (table.sampler == "ddim20") & (table.method == "toca")].iloc[0]
    half = (row.fid_hi - row.fid_lo) / 2
    plant(b, row, "fid", row.fid + 0.25 * half)  # a quarter of its interval: within the default 0.5
    report = compare_results(a, b)
    main_csv = next(t for t in report["tables"] if t["table"] == "tables/main.csv")
    assert not report["identical"] and report["agree"] and main_csv["agree"]
    assert [(c["row"], c["column"]) for c in main_csv["cells"]] == [("DiT-digits/ddim20/toca", "fid")]
    assert main_csv["cells"][0]["units"] == pytest.approx(0.25)
    assert report["files"]["differ"] == ["tables/main.csv"]

    plant(b, row, "fid", row.fid - 2 * half)  # two half-widths: beyond the tolerance
    with pytest.raises(SystemExit) as stop:
        main(["compare", str(a), str(b), "--json"])
    assert stop.value.code == 1
    report = json.loads(capsys.readouterr().out)
    main_csv = next(t for t in report["tables"] if t["table"] == "tables/main.csv")
    assert not report["agree"] and main_csv["max_units"] == pytest.approx(2.0)
    assert main(["compare", str(a), str(b), "--tolerance", "2.5"]) == 0  # a looser tolerance accepts it
    out = capsys.readouterr().out
    assert "table tables/main.csv: agree" in out and "fid: 1 rows differ" in out


def test_compare_numbers_without_interval_rows_and_verdicts(tmp_path):
    a, b = folders(tmp_path)
    table = pd.read_csv(a / "tables" / "main.csv")
    row = table[(table.model == "DiT-digits") & (table.sampler == "ddim20") & (table.method == "toca")].iloc[0]
    plant(b, row, "macs_speedup", row.macs_speedup * 1.01)  # no interval: must be equal up to rtol
    plant(b, row, "d_fid_hi", 0.5)  # the paired interval of ΔFID now includes 0
    result = compare_table(a / "tables" / "main.csv", b / "tables" / "main.csv")
    cells = {c["column"]: c for c in result["cells"]}
    assert cells["macs_speedup"]["units"] is None and not cells["macs_speedup"]["within"]
    assert result["verdicts_changed"] == 1 and not result["agree"]
    assert compare_table(a / "tables" / "main.csv", b / "tables" / "main.csv", tolerance=1e9, rtol=0.02)["agree"]

    pd.read_csv(b / "tables" / "main.csv").iloc[1:].to_csv(b / "tables" / "main.csv", index=False)
    result = compare_table(a / "tables" / "main.csv", b / "tables" / "main.csv")
    assert result["only_a_rows"] == [f"{table.model[0]}/{table.sampler[0]}/{table.method[0]}"] and not result["agree"]


def test_compare_missing_folder_is_one_line(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "nowhere"), str(DIGITS)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not a folder: give the results folder" in err


def test_compare_matches_budget_table_rows_by_their_keys(tmp_path):
    """The budget tables' rows are matched by model, sampler, criterion, budget and family (a row per
    family and budget), so a folder agrees with itself and a moved value is found in its row."""
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    shutil.copy(DEFAULT / "tables" / "budgets.csv", a)
    table = pd.read_csv(a)
    assert compare_table(a, a)["agree"] and compare_table(a, a)["keys"] == ["model", "sampler", "criterion",
                                                                           "budget", "family"]
    i = table.index[(table.verdict == "winner")][0]
    half = (table.at[i, "value_hi"] - table.at[i, "value_lo"]) / 2
    table.at[i, "value"] += 3 * half
    table.to_csv(b, index=False)
    result = compare_table(a, b)
    assert not result["agree"] and [c["column"] for c in result["cells"]] == ["value"]
