"""Result tables: the main table and the ablation of one method's variants, from the runs' small JSON files.

* ``main.{csv,md,tex}``: one row per (model, sampler, run label), in the layout of the caching
  papers: MACs per image and MACs speed-up, quality (FID, sFID, IS, precision, recall, KID, class consistency) and fidelity to the
  reference's images (PSNR, SSIM), each with its bootstrap 95% interval (``_lo``/``_hi``), and the
  difference of each quality metric from the reference run of the same model and sampler with a
  *paired* 95% interval (``d_<metric>``, ``_lo``, ``_hi``: the same samples' noise and labels,
  resampled with the same index sets). In ``main.md`` a ``*`` marks a difference whose
  interval excludes 0 (resolved at 95%); ``role`` says which row is the uncached reference and which the
  fewer-steps baseline. ``reported_fid``/``reported_source`` hold a published FID where the row's
  backbone, sampler, guidance and method match an entry of the ``reported`` YAML (on the digits
  testbed none match and the columns stay empty; published numbers appear only in columns
  labelled "reported", never mixed with ours).
* ``ablation.{csv,md}``: the runs of the method whose variants the config's ``ablation:`` labels
  are, in every (model, sampler) that has ablation runs (tuned points aside): what each label varies, one column per
  resolved setting that differs between those runs (as the runs recorded them), then MACs
  speed-up, FID, sFID and PSNR to the reference; a one-line table saying so when the config has
  no ablation runs.
* ``latency.{csv,md}``: the measured side of the main table, one row per run: the sampling
  seconds its ``run.provenance.json`` recorded, seconds per image, the speed-up over the
  reference run, the realization ratio (speed-up ÷ MACs speed-up), threads, CPU and load. These
  are this machine's and this moment's numbers: volatile (``tokencache.results.VOLATILE``), kept
  out of ``main`` and ``ablation``, whose every byte a faithful rerun reproduces.

Every file is written atomically (a temporary file, then a rename).
"""
import json
import math
from pathlib import Path

import pandas as pd
import yaml

#: quality and fidelity metrics, in table order; each gets ``_lo``/``_hi`` (its 95% interval)
METRICS = ["fid", "sfid", "inception_score", "precision", "recall", "kid", "class_consistency", "psnr_to_full",
           "ssim_to_full"]
#: metrics whose difference from the run's reference gets a paired interval (``d_<m>``, ``d_<m>_lo``, ``d_<m>_hi``)
PAIRED = ["fid", "sfid", "inception_score", "precision", "recall", "kid", "class_consistency"]
COLUMNS = (["model", "sampler", "method", "role", "setting", "macs_g_per_image", "macs_speedup"]
           + [c for m in METRICS for c in (m, f"{m}_lo", f"{m}_hi")]
           + [c for m in PAIRED for c in (f"d_{m}", f"d_{m}_lo", f"d_{m}_hi")]
           + ["identical_to_full", "reported_fid", "reported_source", "num_samples", "bootstrap_resamples"])
#: the Markdown table: value [95% interval] per metric, and the paired differences from full
MD_HEADERS = {"fid": "FID", "d_fid": "ΔFID vs full", "sfid": "sFID", "d_sfid": "ΔsFID", "inception_score": "IS",
              "precision": "precision", "recall": "recall", "kid": "KID", "d_kid": "ΔKID",
              "class_consistency": "class-consistency", "psnr_to_full": "PSNR to full (dB)",
              "ssim_to_full": "SSIM to full"}

ABLATION_RESULTS = ["macs_speedup", "fid", "sfid", "psnr_to_full"]
#: the latency table: measured seconds (volatile) beside the MACs speed-up, and where they were measured
LATENCY_COLUMNS = ["model", "sampler", "method", "role", "num_samples", "seconds", "latency_s_per_image", "speedup",
                   "macs_speedup", "realization", "threads", "cpu_model", "load_average_1min"]


def write_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`tokencache.io.write_atomic`)."""
    from tokencache.io import write_atomic as write

    write(path, text)


def run_key(metrics_path: str) -> tuple[str, str, str]:
    """(model id, sampler, run label) of ``runs/<model>/<sampler>/<label>/metrics.json``."""
    parts = Path(metrics_path).parts
    return parts[-4], parts[-3], parts[-2]


def setting_text(params: dict, file_param) -> str:
    """A run's method parameters as ``k=v, …`` (its calibration file left out: it names no setting)."""
    return ", ".join(f"{k}={v}" for k, v in params.items() if v is not None and k != file_param)


# ---------------------------------------------------------------------------------- reported FIDs


def load_reported(path) -> list[dict]:
    """Entries of the reported-FID YAML (a list of mappings; see config/reported.yaml)."""
    if not path or not Path(path).is_file():
        return []
    return yaml.safe_load(Path(path).read_text()) or []


def matches(entry: dict, sampler: str, run: dict) -> bool:
    """Whether a published number was measured on this run's backbone, sampler, guidance and method.

    ``model`` is the preset name recorded with the run; optional keys narrow the match:
    ``input_size`` (latent side: 32 = 256 px), ``cfg_scale``, ``scale_pow``, ``steps`` (steps
    actually sampled, e.g. 125 for fewer steps) and ``params`` (a subset of the method's values).
    """
    config, request, cache = run["model_config"], run["request"], run["cache"]
    checks = [
        entry["model"] == config["name"],
        entry["sampler"] == sampler,
        entry["method"] == cache["method"],
        "input_size" not in entry or entry["input_size"] == config.get("input_size"),
        "cfg_scale" not in entry or math.isclose(entry["cfg_scale"], float(request["cfg_scale"])),
        "scale_pow" not in entry or math.isclose(entry["scale_pow"], float(request["scale_pow"])),
        "steps" not in entry or entry["steps"] == run.get("steps"),
        all(cache["params"].get(k) == v for k, v in entry.get("params", {}).items()),
    ]
    return all(checks)


def reported_columns(entries: list[dict], sampler: str, run: dict) -> dict:
    """``reported_fid`` (the first verified match, else the first) and every match with its source."""
    found = [e for e in entries if matches(e, sampler, run)]
    if not found:
        return {"reported_fid": None, "reported_source": None}
    found.sort(key=lambda e: not e.get("verified", False))  # stable: verified first, YAML order kept
    sources = "; ".join(f"{e['fid']:g} {e['source']}{'' if e.get('verified', False) else ' (unverified)'}"
                        for e in found)
    return {"reported_fid": found[0]["fid"], "reported_source": sources}


# ---------------------------------------------------------------------------------- main table


def row(metrics_path: str, run_path: str, reported: list[dict]) -> dict:
    """One main-table row from a run's metrics.json and run.json."""
    from tokencache.metrics.flops import run_macs

    model, sampler, label = run_key(metrics_path)
    metrics = json.loads(Path(metrics_path).read_text())
    run = json.loads(Path(run_path).read_text())
    macs = run_macs(run)
    setting = setting_text(run["cache"]["params"], run["cache"].get("calibration_param")) or "—"
    out = {"model": model, "sampler": sampler, "method": label, "role": run["cache"].get("role", "cache"),
           "setting": setting,
           "num_samples": run["num_samples"], "macs_g_per_image": macs["macs_per_image"] / 1e9, "macs_speedup": macs["macs_speedup"]}
    out.update({k: metrics.get(k) for k in COLUMNS if k in metrics})
    for name, bounds in (metrics.get("ci95") or {}).items():
        if bounds is not None and name in METRICS:
            out[f"{name}_lo"], out[f"{name}_hi"] = bounds
    out["bootstrap_resamples"] = (metrics.get("bootstrap") or {}).get("resamples")
    out.update(reported_columns(reported, sampler, run))
    return out


def bootstrap_file(metrics_path) -> Path:
    """The per-resample values an evaluation wrote beside its metrics.json (``metrics.bootstrap.npz``)."""
    return Path(metrics_path).with_suffix(".bootstrap.npz")


def paired_differences(table: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Each run's difference from its (model, sampler)'s reference run with a paired 95% interval.

    Both runs share every sample's noise and label and were resampled with the same index sets
    (the evaluation's seed and sample count; checked through their digest), so the difference
    is taken resample by resample (:func:`tokencache.metrics.bootstrap.paired_interval`).
    Without bootstrap files the columns stay empty.
    """
    import numpy as np

    from tokencache.metrics.bootstrap import paired_interval

    paths = {run_key(p): p for p in metrics}
    values = {}
    for key, path in paths.items():
        file = bootstrap_file(path)
        if file.is_file():
            with np.load(file) as data:
                values[key] = {k: data[k] for k in data.files}
    table = table.copy()
    for col in [c for m in PAIRED for c in (f"d_{m}", f"d_{m}_lo", f"d_{m}_hi")]:
        table[col] = np.nan
    for i, r in table.iterrows():
        full_rows = table[(table.model == r.model) & (table.sampler == r.sampler) & (table.role == "reference")]
        if full_rows.empty:
            continue
        full = full_rows.iloc[0]
        key, full_key = (r.model, r.sampler, r.method), (r.model, r.sampler, full.method)
        for m in PAIRED:
            if pd.notna(r.get(m)) and pd.notna(full.get(m)):
                table.at[i, f"d_{m}"] = r[m] - full[m]
        if key not in values or full_key not in values:
            continue
        a, b = values[key], values[full_key]
        if "indices_sha256" not in a or "indices_sha256" not in b:
            continue  # evaluated without bootstrap
        if str(a["indices_sha256"]) != str(b["indices_sha256"]):
            raise ValueError(f"{'/'.join(key)} and {'/'.join(full_key)} were resampled with different index sets "
                             f"(other seed or sample count): their difference cannot be paired")
        for m in PAIRED:
            name = f"values_{m}"
            if name in a and name in b and pd.notna(table.at[i, f"d_{m}"]):
                bounds = paired_interval(a[name], b[name], point=table.at[i, f"d_{m}"])
                if bounds is not None:
                    table.at[i, f"d_{m}_lo"], table.at[i, f"d_{m}_hi"] = bounds
    return table


def resolved(table: pd.DataFrame, metric: str = "fid") -> pd.Series:
    """Whether each run's paired 95% interval of its difference from the reference excludes 0."""
    lo, hi = table.get(f"d_{metric}_lo"), table.get(f"d_{metric}_hi")
    if lo is None or hi is None:
        return pd.Series(False, index=table.index)
    return ((lo > 0) | (hi < 0)).fillna(False)


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}g}"


def markdown_table(table: pd.DataFrame) -> str:
    """main.md: cost columns, then each metric as ``value [low, high]`` (95% interval), and
    the paired differences from the reference as ``+d [low, high]`` (``*``: the interval excludes 0)."""
    rows = []
    for _, r in table.iterrows():
        out = {"model": r.model, "sampler": r.sampler, "method": r.method, "setting": r.setting,
               "MMACs/img": _fmt(r.macs_g_per_image * 1e3), "MACs speed-up": _fmt(r.macs_speedup, 3)}
        for m, header in MD_HEADERS.items():
            if m.startswith("d_"):
                base = m[2:]
                d, lo, hi = r.get(m), r.get(f"{m}_lo"), r.get(f"{m}_hi")
                if r.role == "reference" or d is None or pd.isna(d):
                    out[header] = "—"
                    continue
                mark = "*" if pd.notna(lo) and (lo > 0 or hi < 0) else ""
                bounds = f" [{lo:+.3g}, {hi:+.3g}]" if pd.notna(lo) else ""
                out[header] = f"{d:+.3g}{bounds}{mark}"
            else:
                v, lo, hi = r.get(m), r.get(f"{m}_lo"), r.get(f"{m}_hi")
                out[header] = _fmt(v) + (f" [{lo:.4g}, {hi:.4g}]" if pd.notna(lo) and pd.notna(v) else "")
        out["samples"] = str(int(r.num_samples))
        rows.append(out)
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True) + "\n"


def main_table(metrics: list[str], runs: list[str], reported: list[dict]) -> pd.DataFrame:
    """All rows and the paired differences from each (model, sampler)'s reference run, sorted by cost."""
    table = pd.DataFrame([row(m, r, reported) for m, r in zip(metrics, runs)])
    table = paired_differences(table, list(metrics))
    table = table[[c for c in COLUMNS if c in table.columns]]
    return table.sort_values(["model", "sampler", "macs_g_per_image"], ascending=[True, True, False])


# ---------------------------------------------------------------------------------- latency


def latency_table(table: pd.DataFrame, runs: list[str]) -> pd.DataFrame:
    """The main table's rows with the sampling time each run's ``run.provenance.json`` recorded.

    ``speedup`` is the reference run's seconds per image over the run's (same model and sampler),
    ``realization`` that speed-up over the MACs speed-up. A run without its provenance file (a
    results folder written before the split) has empty time columns.
    """
    from tokencache.results import read_provenance

    measured = {}
    for path in runs:
        volatile = read_provenance(path)
        machine = volatile.get("provenance") or {}
        measured[run_key(path)] = {"seconds": volatile.get("seconds"), "threads": machine.get("threads"),
                                   "cpu_model": machine.get("cpu_model"),
                                   "load_average_1min": machine.get("load_average_1min")}
    rows = []
    for _, r in table.iterrows():
        found = measured.get((r.model, r.sampler, r.method), {})
        seconds = found.get("seconds")
        rows.append({"model": r.model, "sampler": r.sampler, "method": r.method, "role": r.role,
                     "num_samples": r.num_samples, "seconds": seconds,
                     "latency_s_per_image": None if seconds is None else seconds / r.num_samples,
                     "macs_speedup": r.macs_speedup, **{k: found.get(k) for k in ("threads", "cpu_model",
                                                                                   "load_average_1min")}})
    latency = pd.DataFrame(rows)
    latency["latency_s_per_image"] = latency["latency_s_per_image"].astype(float)
    full = latency[latency.role == "reference"].set_index(["model", "sampler"])["latency_s_per_image"]
    latency["speedup"] = [full.get((m, s), float("nan")) / lat if lat else float("nan")
                          for m, s, lat in zip(latency.model, latency.sampler, latency.latency_s_per_image)]
    latency["realization"] = latency.speedup / latency.macs_speedup
    return latency[LATENCY_COLUMNS]


def latency_markdown(latency: pd.DataFrame) -> str:
    """latency.md: seconds per image, the speed-ups measured and counted, and where it was measured."""
    rows = [{"model": r.model, "sampler": r.sampler, "method": r.method,
             "s/img": _fmt(r.latency_s_per_image, 3), "latency speed-up": _fmt(r.speedup, 3),
             "MACs speed-up": _fmt(r.macs_speedup, 3), "realization": _fmt(r.realization, 3),
             "threads": "—" if pd.isna(r.threads) else str(int(r.threads)),
             "load (1 min)": _fmt(r.load_average_1min, 3)} for _, r in latency.iterrows()]
    cpus = sorted({str(c) for c in latency.cpu_model.dropna()})
    note = (f"Sampling jobs' wall-clock time on {', '.join(cpus) or 'an unrecorded CPU'} (volatile: this machine's and "
            f"this moment's numbers; `tokencache latency` times methods side by side).\n\n")
    return note + pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True) + "\n"


# ---------------------------------------------------------------------------------- ablation


def ablation_table(table: pd.DataFrame, runs: list[str], labels: list[str]) -> pd.DataFrame:
    """The runs of the ablated method in every (model, sampler) with ablation runs, settings then results.

    ``varied`` names what the label changes from the method's defaults (its configured parameters,
    the calibration file aside); "default" marks the reference row, which comes first, then other
    strengths of the method, then the ablation runs. The setting columns are the resolved settings
    (``cache.resolved`` of the run JSON) that differ between the rows shown.
    """
    by_key = {run_key(path): json.loads(Path(path).read_text()) for path in runs}
    scopes = {(m, s) for (m, s, label) in by_key if label in labels}
    method = next(run["cache"]["method"] for (m, s, label), run in by_key.items() if label in labels)
    rows, settings = [], []
    for (model, sampler, label), run in sorted(by_key.items()):
        if (model, sampler) not in scopes or run["cache"]["method"] != method or "@" in label:
            continue  # (a tuned point, FAMILY@k=v, belongs to the budget tables)
        file_param = run["cache"].get("calibration_param")
        requested = run["request"].get("method_params", {})
        varied = ", ".join(f"{k}={v}" for k, v in requested.items() if k != file_param) or "default"
        resolved = {k: v for k, v in run["cache"].get("resolved", run["cache"]["params"]).items() if k != file_param}
        settings.append(resolved)
        result = table[(table.model == model) & (table.sampler == sampler) & (table.method == label)].iloc[0]
        rows.append({"model": model, "sampler": sampler, "method": label, "varied": varied, **resolved,
                     **{k: result.get(k) for k in ABLATION_RESULTS},
                     "_order": 2 if label in labels else (0 if varied == "default" else 1)})
    ablation = pd.DataFrame(rows)
    varying = [k for k in dict.fromkeys(k for s in settings for k in s)
               if len({json.dumps(s.get(k), sort_keys=True) for s in settings}) > 1]
    ablation = ablation.sort_values(["model", "sampler", "_order", "method"]).drop(columns="_order")
    return ablation[["model", "sampler", "method", "varied", *varying, *ABLATION_RESULTS]]


NO_ABLATION = ("No ablation runs were configured: list the labels of one method's variants under `ablation:` in the "
               "config (e.g. other token choices, block selections or schedules).")


# ---------------------------------------------------------------------------------- output


def titled(banner: str, table: pd.DataFrame = None, markdown: str = None):
    """A table or its Markdown under ``banner`` (a rehearsal's "stand-in weights" line): a first
    ``note`` column of the CSV, a bold first line of the Markdown. Unchanged without a banner."""
    if not banner:
        return table if markdown is None else markdown
    if markdown is not None:
        return f"**{banner}**\n\n{markdown}"
    return table.assign(note=banner)[["note", *table.columns]]


def main(metrics, runs, reported_path, ablation_labels, out, banner: str = "") -> None:
    """Write main.{csv,md,tex}, ablation.{csv,md} and, when ``out`` names them, latency.{csv,md}
    (``out``: output name → path), each titled by ``banner`` when one is given."""
    table = main_table(list(metrics), list(runs), load_reported(reported_path))
    write_atomic(out["csv"], titled(banner, table).to_csv(index=False))
    write_atomic(out["md"], titled(banner, markdown=markdown_table(table)))
    write_atomic(out["tex"], table.to_latex(index=False, float_format="%.4g", escape=True, na_rep="--",
                                            caption=banner or None))
    if "latency_csv" in out:
        latency = latency_table(table, list(runs))
        write_atomic(out["latency_csv"], titled(banner, latency).to_csv(index=False))
        write_atomic(out["latency_md"], titled(banner, markdown=latency_markdown(latency)))

    if ablation_labels:
        ablation = ablation_table(table, list(runs), list(ablation_labels))
        write_atomic(out["ablation_csv"], titled(banner, ablation).to_csv(index=False))
        write_atomic(out["ablation_md"], titled(banner, markdown=ablation.to_markdown(index=False, floatfmt=".4g") + "\n"))
    else:
        write_atomic(out["ablation_csv"], pd.DataFrame({"note": [banner or NO_ABLATION]}).to_csv(index=False))
        write_atomic(out["ablation_md"], titled(banner, markdown=NO_ABLATION + "\n"))


if __name__ == "__main__" and "snakemake" in globals():
    sm = snakemake  # noqa: F821
    main([*sm.input.metrics, *sm.input.get("tuned_metrics", [])], [*sm.input.runs, *sm.input.get("tuned_runs", [])],
         sm.input.reported, sm.params.ablation_labels,
         {name: getattr(sm.output, name) for name in ("csv", "md", "tex", "ablation_csv", "ablation_md", "latency_csv",
                                                      "latency_md")}, banner=sm.params.get("banner", ""))
