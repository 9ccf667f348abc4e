"""Budget tables (workflow/scripts/budgets.py) on a small synthetic results folder.

One model and sampler; three tuned families (``fora``, ``toca``, ``duca``), the uncached ``full``
and one hand-picked run (``fora2``, better than everything, which the tables must ignore). Each
run's per-resample values share one "sample" component (the paired part that cancels) plus the
run's own noise: tiny for ``fora`` (its difference from the winner is resolved), large for
``duca`` (its difference contains 0). Expected winners and intervals are computed here by hand.
"""
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

RESAMPLES = 400
DIGEST = "ab" * 32
BUDGETS = [1.5, 2, 3, 4]

#: label → (role, macs_speedup, fid, psnr_to_full, d_fid_hi, own noise of fid, own noise of psnr)
RUNS = {
    "full": ("reference", 1.0, 10.0, math.nan, 0.0, 0.0, 0.0),
    "fora@interval=2": ("cache", 1.999, 10.02, 31.0, 0.4, 0.01, 0.01),  # just below 2×: never counts at 2×
    "fora@interval=3": ("cache", 2.8, 10.9, 27.0, 1.1, 0.01, 0.01),
    "toca@ratio=0.1": ("cache", 2.0 * (1 - 1e-12), 10.1, 33.0, 0.3, 0.01, 0.01),  # reaches 2× within the tolerance
    "toca@ratio=0.05": ("cache", 3.5, 11.5, 25.0, 1.8, 0.01, 0.01),
    "duca@ratio=0.2": ("cache", 1.6, 10.05, 36.0, 0.2, 0.3, 0.3),
    "duca@ratio=0.1": ("cache", 2.05, 10.15, 32.5, 0.45, 0.3, 0.3),
    "fora2": ("cache", 5.0, 9.0, 50.0, -0.5, 0.01, 0.01),  # hand-picked: ignored
}


def script(name: str):
    """A module of workflow/scripts/ (conftest.workflow_script)."""
    from conftest import workflow_script

    return workflow_script(name)


def values_of(label: str) -> dict:
    """A run's per-resample values: the shared sample component plus the run's own noise."""
    _, _, fid, psnr, _, fid_noise, psnr_noise = RUNS[label]
    shared = np.random.default_rng(0).normal(size=RESAMPLES)
    own = np.random.default_rng(sorted(RUNS).index(label) + 1)
    out = {"values_fid": fid + 0.8 * shared + fid_noise * own.normal(size=RESAMPLES),
           "indices_sha256": np.array(DIGEST)}
    if not math.isnan(psnr):
        out["values_psnr_to_full"] = psnr + 0.5 * shared + psnr_noise * own.normal(size=RESAMPLES)
    return out


def make_results(folder: Path, runs=RUNS, resamples=RESAMPLES) -> tuple[str, list[str]]:
    """results/<name>/tables/main.csv and runs/M/s/<label>/metrics.bootstrap.npz; returns (csv, npz paths)."""
    rows, paths = [], []
    for label, (role, speedup, fid, psnr, d_fid_hi, _, _) in runs.items():
        d_fid = fid - 10.0
        setting = label.partition("@")[2] or "—"
        rows.append({"model": "M", "sampler": "s", "method": label, "role": role, "setting": setting,
                     "macs_speedup": speedup, "fid": fid, "fid_lo": fid - 1, "fid_hi": fid + 1,
                     "psnr_to_full": psnr, "psnr_to_full_lo": psnr - 0.4, "psnr_to_full_hi": psnr + 0.4,
                     "d_fid": d_fid, "d_fid_lo": d_fid - 0.3, "d_fid_hi": d_fid_hi, "bootstrap_resamples": resamples})
        path = folder / "runs" / "M" / "s" / label / "metrics.bootstrap.npz"
        path.parent.mkdir(parents=True)
        np.savez(path, **values_of(label))
        paths.append(str(path))
    csv = folder / "tables" / "main.csv"
    csv.parent.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(csv, index=False)
    return str(csv), paths


def run_main(folder: Path, csv: str, paths: list[str], **kwargs) -> dict:
    budgets = script("budgets")
    out = {name: str(folder / f"out.{name}") for name in budgets.OUTPUTS}
    budgets.main(csv, paths, out, **{"budgets": BUDGETS, "psnr_budgets": [30, 35], "fid_budget": 0.5, **kwargs})
    return out


def paired_by_hand(a: str, b: str, metric: str) -> tuple[float, float]:
    """The paired 95% interval of a − b, re-centred on the difference of the point estimates."""
    diff = values_of(a)[f"values_{metric}"] - values_of(b)[f"values_{metric}"]
    column = {"fid": 2, "psnr_to_full": 3}[metric]
    point = RUNS[a][column] - RUNS[b][column]
    shifted = diff - (np.median(diff) - point)
    lo, hi = np.percentile(shifted, [2.5, 97.5])
    return float(lo), float(hi)


@pytest.fixture
def written(tmp_path):
    csv, paths = make_results(tmp_path / "results")
    out = run_main(tmp_path, csv, paths)
    return out, pd.read_csv(out["csv"]), pd.read_csv(out["quality_csv"])


def at(table: pd.DataFrame, criterion: str, budget: float) -> pd.DataFrame:
    return table[(table.criterion == criterion) & (table.budget == budget)].set_index("family")


def test_winner_and_budget_filter(written):
    _, table, _ = written
    assert set(table.family) == {"fora", "toca", "duca"}  # fora2 (hand-picked) and full are not families
    assert not table.label.fillna("").str.fullmatch("fora2|full").any()
    # ≥ 1.5×: every point counts; the lowest FID is fora@interval=2's (10.02 at 1.999×; fora2's 9.0 is hand-picked)
    low = at(table, "fid", 1.5)
    assert low.loc["fora", "label"] == "fora@interval=2" and low.loc["fora", "verdict"] == "winner"
    # ≥ 2×: fora@interval=2 (1.999×) no longer counts, toca@ratio=0.1 (2×·(1 − 1e-12)) still does
    two = at(table, "fid", 2)
    assert two.verdict.to_dict() == {"duca": "tied", "fora": "behind", "toca": "winner"}
    assert two.label.to_dict() == {"duca": "duca@ratio=0.1", "fora": "fora@interval=3", "toca": "toca@ratio=0.1"}
    psnr = at(table, "psnr_to_full", 2)  # higher is better: toca@ratio=0.1 (33) over duca@ratio=0.1 (32.5)
    assert psnr.loc["toca", "verdict"] == "winner" and psnr.loc["fora", "label"] == "fora@interval=3"
    assert at(table, "psnr_to_full", 1.5).loc["duca", "label"] == "duca@ratio=0.2"  # 36 dB at 1.6×


def test_tied_and_behind_from_the_paired_interval(written):
    _, table, _ = written
    two = at(table, "fid", 2)
    for family, label, verdict in (("duca", "duca@ratio=0.1", "tied"), ("fora", "fora@interval=3", "behind")):
        lo, hi = paired_by_hand(label, "toca@ratio=0.1", "fid")
        assert (lo <= 0 <= hi) == (verdict == "tied")  # the data were built that way
        row = two.loc[family]
        assert row.diff_lo == pytest.approx(lo, rel=1e-5) and row.diff_hi == pytest.approx(hi, rel=1e-5)
        assert row.diff_to_winner == pytest.approx(RUNS[label][2] - 10.1, rel=1e-5)
        assert row.verdict == verdict
    winner = two.loc["toca"]
    assert (winner.diff_to_winner, winner.diff_lo, winner.diff_hi) == (0, 0, 0)
    assert winner.value == 10.1 and winner.value_lo == 9.1 and winner.d_fid_hi == 0.3
    lo, hi = paired_by_hand("fora@interval=3", "toca@ratio=0.1", "psnr_to_full")
    fora = at(table, "psnr_to_full", 2).loc["fora"]
    assert hi < 0 and fora.verdict == "behind" and fora.diff_hi == pytest.approx(hi, rel=1e-5)


def test_unreached(written):
    _, table, _ = written
    three = at(table, "fid", 3)
    assert three.verdict.to_dict() == {"duca": "unreached", "fora": "unreached", "toca": "winner"}
    assert three.loc[["duca", "fora"], ["label", "macs_speedup", "value", "diff_lo"]].isna().all().all()
    assert set(at(table, "psnr_to_full", 4).verdict) == {"unreached"}  # no point reaches 4×
    assert len(table) == 2 * len(BUDGETS) * 3  # criterion × budget × family


def test_markdown_and_headline(written):
    out, _, _ = written
    md = Path(out["md"]).read_text()
    assert "### M · s · FID (lower is better)" in md and "### M · s · PSNR to full (higher is better)" in md
    fid_two = next(line for line in md.splitlines() if line.startswith("| 2× "))
    assert "**+0.1 [−0.2, 0.3] @2×**" in fid_two  # the winner: ΔFID vs full with its paired interval, bold
    assert "≈ +0.15 [" in fid_two and "@2.05×" in fid_two  # duca tied
    assert fid_two.rstrip(" |").endswith("toca (duca)")
    assert "| 4× " in md and md.count("—") >= 6
    headline = Path(out["headline"]).read_text().split("\n\n")
    assert len(headline) == 2
    assert headline[0].startswith("M, s, at ≥ 2× MACs speed-up: **toca** (toca@ratio=0.1, 2×) keeps FID best "
                                  "(ΔFID +0.1 [−0.2, 0.3] vs no caching; tied: duca; behind: fora)")
    assert "stays closest to the uncached images (PSNR 33 [32.6, 33.4] dB" in headline[1]


def test_quality_budgets(written):
    out, _, quality = written
    fastest = {(r.family, r.quality): r.label if isinstance(r.label, str) else None for r in quality.itertuples()}
    # by hand: the largest speed-up with PSNR ≥ 30 / ≥ 35, and with the upper end of ΔFID's interval ≤ 0.5
    expected = {}
    for family in ("duca", "fora", "toca"):
        points = {k: v for k, v in RUNS.items() if k.startswith(family + "@")}
        for name, ok in (("psnr_to_full>=30", lambda v: v[3] >= 30), ("psnr_to_full>=35", lambda v: v[3] >= 35),
                         ("d_fid_hi<=0.5", lambda v: v[4] <= 0.5)):
            fits = [k for k, v in points.items() if ok(v)]
            expected[(family, name)] = max(fits, key=lambda k: points[k][1]) if fits else None
    assert fastest == expected
    assert expected[("duca", "psnr_to_full>=30")] == "duca@ratio=0.1" and expected[("fora", "psnr_to_full>=35")] is None
    md = Path(out["quality_md"]).read_text()
    assert "| duca " in md and "**2.05× (ratio=0.1)**" in md and "**1.6× (ratio=0.2)**" in md
    assert "ΔFID ≤ 0.5 (upper 95%)" in md and "fora2" not in md


def test_same_inputs_same_bytes(tmp_path):
    csv, paths = make_results(tmp_path / "results")
    first = run_main(tmp_path / "a", csv, paths)
    second = run_main(tmp_path / "b", csv, list(reversed(paths)))
    for name in first:
        assert Path(first[name]).read_bytes() == Path(second[name]).read_bytes(), name


def test_banner_heads_every_file(tmp_path):
    csv, paths = make_results(tmp_path / "results")
    out = run_main(tmp_path, csv, paths, banner="REHEARSAL: not results")
    for name in ("md", "quality_md", "headline"):
        assert Path(out[name]).read_text().startswith("**REHEARSAL: not results**\n\n"), name
    for name in ("csv", "quality_csv"):
        assert pd.read_csv(out[name]).columns[0] == "note", name


def test_no_tuned_runs_is_one_line(tmp_path):
    csv, paths = make_results(tmp_path / "results", {k: v for k, v in RUNS.items() if "@" not in k})
    out = run_main(tmp_path, csv, paths)
    for name, path in out.items():
        text = Path(path).read_text()
        assert "no tuned runs: set `tuning:` in the config" in text and text.count("\n") <= 2, name


def test_missing_bootstrap_file_names_it(tmp_path):
    csv, paths = make_results(tmp_path / "results")
    missing = next(p for p in paths if "duca@ratio=0.1" in p)
    with pytest.raises(ValueError, match="duca@ratio=0.1") as error:
        run_main(tmp_path, csv, [p for p in paths if p != missing])
    assert str(Path("runs", "M", "s", "duca@ratio=0.1", "metrics.bootstrap.npz")) in str(error.value)
    assert "\n" not in str(error.value)


def test_without_resamples_no_verdict_is_claimed(tmp_path):
    """Runs evaluated without bootstrap have no interval: no file is needed, and no tie is claimed."""
    csv, _ = make_results(tmp_path / "results", resamples=float("nan"))
    out = run_main(tmp_path, csv, [])
    two = at(pd.read_csv(out["csv"]), "fid", 2)
    assert two.verdict.to_dict() == {"duca": "no-interval", "fora": "no-interval", "toca": "winner"}


def test_different_index_sets_cannot_be_paired(tmp_path):
    csv, paths = make_results(tmp_path / "results")
    path = next(p for p in paths if "duca@ratio=0.1" in p)
    np.savez(path, **{**values_of("duca@ratio=0.1"), "indices_sha256": np.array("cd" * 32)})
    with pytest.raises(ValueError, match="different index sets"):
        run_main(tmp_path, csv, paths)
