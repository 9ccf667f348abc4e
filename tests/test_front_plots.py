"""Figures of tuned runs (workflow/scripts/plots.py): one curve per family, and the tuning figure.

Small synthetic inputs: a main.csv and run.json files of one model and sampler, where two
families of one cache method (``tokencache`` and ``tokencache-v2``) must be two curves, and
front.json files of two samplers. The figures are taken before they are saved (``save_atomic``
replaced), so the test reads what was drawn: lines, faint points, labels and legend.
"""
import json
import math
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest


#: label → (cache method, role, macs_speedup, fid, psnr_to_full)
RUNS = {
    "full": ("full", "reference", 1.0, 10.0, math.nan),
    "tokencache@cache_ratio=0.5": ("tokencache", "cache", 1.5, 10.2, 35.0),
    "tokencache@cache_ratio=0.9": ("tokencache", "cache", 2.5, 10.8, 30.0),
    "tokencache-v2@cache_ratio=0.5,k1=3": ("tokencache", "cache", 1.8, 10.1, 36.0),
    "tokencache-v2@cache_ratio=0.9,k1=3": ("tokencache", "cache", 3.0, 10.6, 31.0),
    "tc-strong": ("tokencache", "cache", 1.2, 10.3, 33.0),  # hand-picked, same method as both families
    "fora2": ("fora", "cache", 2.0, 10.5, 32.0),
    "fora3": ("fora", "cache", 2.9, 11.0, 28.0),
}


def script(name: str):
    """A module of workflow/scripts/ (conftest.workflow_script)."""
    from conftest import workflow_script

    return workflow_script(name)


@pytest.fixture
def captured(monkeypatch):
    """plots.py with its figures kept (name of the output file → figure) instead of saved."""
    plots = script("plots")
    figures = {}
    monkeypatch.setattr(plots, "save_atomic", lambda fig, path: figures.__setitem__(Path(path).stem, fig))
    yield plots, figures
    for fig in figures.values():
        plt.close(fig)


def results(folder: Path) -> tuple[str, list[str]]:
    """tables/main.csv and runs/M/s/<label>/run.json of :data:`RUNS`."""
    rows, paths = [], []
    for label, (method, role, speedup, fid, psnr) in RUNS.items():
        rows.append({"model": "M", "sampler": "s", "method": label, "role": role, "setting": "—",
                     "macs_g_per_image": 1.0 / speedup, "macs_speedup": speedup, "fid": fid, "fid_lo": fid - 1,
                     "fid_hi": fid + 1, "psnr_to_full": psnr, "psnr_to_full_lo": psnr - 0.5,
                     "psnr_to_full_hi": psnr + 0.5, "d_fid": fid - 10, "d_fid_lo": fid - 10.2, "d_fid_hi": fid - 9.8,
                     "num_samples": 16})
        path = folder / "runs" / "M" / "s" / label / "run.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"cache": {"method": method, "role": role,
                                              "per_step": {"token_fraction": [1.0, 0.5, 1.0, 0.5]}},
                                    "model_config": {"input_size": 8, "in_channels": 1}}))
        paths.append(str(path))
    csv = folder / "tables" / "main.csv"
    csv.parent.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(csv, index=False)
    return str(csv), paths


def solid_lines(ax) -> list:
    """The curves of a panel: solid lines, not the gold Pareto band (error-bar caps have no line style)."""
    return [line for line in ax.lines if line.get_linestyle() == "-" and line.get_color() != "gold"]


def test_tuned_runs_are_one_curve_per_family(tmp_path, captured):
    plots, figures = captured
    csv, runs = results(tmp_path)
    names = ["pareto_macs", "macs_vs_fid", "pareto_psnr", "token_fraction"]
    data = plots.main(csv, runs, [], {n: str(tmp_path / f"{n}.png") for n in names})
    assert set(data["pareto_macs"].label) == set(RUNS)  # every row is still a point

    ax = figures["pareto_macs"].axes[0]
    curves = {tuple(line.get_xdata()): line.get_color() for line in solid_lines(ax)}
    tokencache, v2 = (1.5, 2.5), (1.8, 3.0)  # each family's points, by speed-up
    assert tokencache in curves and v2 in curves and (2.0, 2.9) in curves  # fora's hand-picked curve as before
    assert curves[tokencache] != curves[v2]
    for xs in curves:  # no curve mixes two families, nor a family with the hand-picked run of its method
        assert len({RUNS[label][0] if "@" not in label else label.split("@")[0]
                    for label, r in RUNS.items() if r[2] in xs and r[1] != "reference"}) == 1, xs
    texts = [t.get_text() for t in ax.texts]
    assert "fora2" in texts and "tc-strong" in texts  # hand-picked runs keep their labels
    assert not [t for t in texts if "@" in t]  # tuned points get none
    legend = [t.get_text() for t in figures["pareto_macs"].legends[0].get_texts()]
    assert {"tokencache (tuned)", "tokencache-v2", "tokencache", "fora"} <= set(legend)

    psnr = {tuple(line.get_xdata()): tuple(line.get_ydata()) for line in solid_lines(figures["pareto_psnr"].axes[0])}
    assert psnr[v2] == (36.0, 31.0)


def test_curve_names():
    plots = script("plots")
    table = pd.DataFrame({"label": ["full", "fora2", "fora@interval=3", "toca@fresh_ratio=0.1", "a@b@c"],
                          "method": ["full", "fora", "fora", "toca", "toca"]})
    assert plots.curve_names(table) == ["full", "fora", "fora (tuned)", "toca", "a"]


def front_file(folder: Path, sampler: str, families: dict) -> str:
    """A front.json of model M: ``families`` maps a family to its (speed-up, PSNR, front) points."""
    methods = {family: {"method": family, "points": [
        {"label": f"{family}@k={i}", "params": {"k": i}, "macs_speedup": x, "macs_speedup_with_overhead": x,
         "psnr_to_full": y, "psnr_to_full_ci95": [y - 0.5, y + 0.5], "front": front}
        for i, (x, y, front) in enumerate(points)]} for family, points in families.items()}
    path = folder / "tuning" / "M" / sampler / "front.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"model": "M", "sampler": sampler, "seed": 2000, "num_samples": 32,
                                "objectives": ["macs_speedup", "psnr_to_full"], "methods": methods}))
    return str(path)


FRONTS = {
    "s1": {"fora": [(2.0, 30.0, True), (3.0, 25.0, True), (2.5, 24.0, False)],
           "toca": [(1.5, 36.0, True), (1.4, 33.0, False), (2.8, 28.0, True), (2.2, 29.0, True)]},
    "s2": {"fora": [(2.0, 31.0, True), (1.8, 29.0, False)]},
}


def test_tuning_figure(tmp_path, captured):
    plots, figures = captured
    files = [front_file(tmp_path, sampler, families) for sampler, families in FRONTS.items()]
    points = plots.tuning_figure(files, tmp_path / "tuning.png")
    assert len(points) == sum(len(p) for families in FRONTS.values() for p in families.values())

    fig = figures["tuning"]
    assert fig._suptitle.get_text().startswith("tuning seed 2000, 32 samples: every point of each search space")
    legend = fig.legends[0]
    colours = {t.get_text(): h.get_color() for t, h in zip(legend.get_texts(), legend.legend_handles)}
    panels = {ax.get_title(): ax for ax in fig.axes}
    assert set(panels) == {"M · s1", "M · s2"}
    for sampler, families in FRONTS.items():
        ax = panels[f"M · {sampler}"]
        faint = [c for c in ax.collections if c.get_alpha() == pytest.approx(0.25)]
        assert sum(len(c.get_offsets()) for c in faint) == sum(len(p) for p in families.values())  # every point
        lines = {tuple(line.get_xdata()): line for line in solid_lines(ax)}
        for family, pts in families.items():
            front = sorted((x, y) for x, y, on in pts if on)
            line = lines[tuple(x for x, _ in front)]  # the front points only, by speed-up
            assert tuple(line.get_ydata()) == tuple(y for _, y in front)
            assert line.get_color() == colours[family]
    assert colours["fora"] != colours["toca"]


def test_tuning_output_of_main(tmp_path, captured):
    """``tuning`` in the outputs draws the fronts given; without front files it says there are none."""
    plots, figures = captured
    csv, runs = results(tmp_path)
    files = [front_file(tmp_path, sampler, families) for sampler, families in FRONTS.items()]
    names = ["pareto_macs", "macs_vs_fid", "pareto_psnr", "token_fraction", "tuning"]
    out = {n: str(tmp_path / f"{n}.png") for n in names}
    data = plots.main(csv, runs, [], out, fronts=files)
    assert len(data["tuning"]) == 9 and figures["tuning"].legends
    figures.clear()
    data = plots.main(csv, runs, [], out)
    assert data["tuning"].empty
    assert [t.get_text() for ax in figures["tuning"].axes for t in ax.texts] == [plots.NO_TUNING]
    figures.clear()
    plots.main(csv, runs, [], {n: p for n, p in out.items() if n != "tuning"}, fronts=files)
    assert "tuning" not in figures


def test_tuning_figure_is_a_png(tmp_path):
    plots = script("plots")
    files = [front_file(tmp_path, sampler, families) for sampler, families in FRONTS.items()]
    plots.tuning_figure(files, tmp_path / "tuning.png")
    assert (tmp_path / "tuning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
