"""Budget tables: which tuned method is best at a given MACs speed-up, and how fast each gets at a given quality.

A comparison at hand-picked strengths says as much about the picks as about the methods. The
tuning stage keeps each family's non-dominated points of its search space (tuning seeds), and
those points are evaluated as runs labelled ``FAMILY@SLUG`` (``fora@interval=3``); this script
reads only them from ``tables/main.csv`` (hand-picked labels, without ``@``, are left out; the
reference run ``full`` is what ΔFID is measured against) and the runs' ``metrics.bootstrap.npz``.

* ``budgets.{csv,md}``: for each model, sampler, criterion (``fid``, lower is better;
  ``psnr_to_full``, higher is better) and MACs speed-up budget b, each family's best evaluated
  point with ``macs_speedup ≥ b``; the best of those is the ``winner``, and every other family's
  difference from it, paired resample by resample (same samples' noise and labels, same index
  sets), says whether it is ``tied`` (95% interval contains 0) or ``behind``; ``unreached``: no
  point of the family reaches b; ``no-interval``: the runs were evaluated without bootstrap
  resamples, so a tie cannot be told from a loss. The Markdown has one matrix per model, sampler
  and criterion (budgets × families).
* ``quality_budgets.{csv,md}``: the inverse question, per family: the largest MACs speed-up
  among its evaluated tuned points with ``psnr_to_full ≥`` each PSNR budget (point estimate),
  and with the upper end of the paired 95% interval of ΔFID vs ``full`` ≤ the FID budget.
* ``headline.md``: one sentence per model, sampler and criterion at the budget nearest 2×:
  who wins, by how much versus no caching, and who is tied.

Without tuned runs every file is one line saying how to get them. Same inputs, same bytes; every
file is written atomically (a temporary file, then a rename).
"""
import math
from pathlib import Path

import numpy as np
import pandas as pd

#: MACs speed-up budgets when the config names none
DEFAULT_BUDGETS = [1.5, 2, 2.5, 3, 4]
#: criterion → (lower is better, Markdown name)
CRITERIA = {"fid": (True, "FID"), "psnr_to_full": (False, "PSNR to full")}
#: a point reaches budget b when macs_speedup ≥ b·(1 − TOLERANCE) (speed-ups are ratios of MAC counts)
TOLERANCE = 1e-9
#: the budget the headline reports (or the nearest one configured)
HEADLINE_BUDGET = 2.0
NO_TUNED = "no tuned runs: set `tuning:` in the config"
OUTPUTS = ("csv", "md", "quality_csv", "quality_md", "headline")

BUDGET_COLUMNS = ["model", "sampler", "criterion", "budget", "family", "label", "setting", "macs_speedup", "value",
                  "value_lo", "value_hi", "d_fid", "d_fid_lo", "d_fid_hi", "psnr_to_full", "psnr_to_full_lo",
                  "psnr_to_full_hi", "diff_to_winner", "diff_lo", "diff_hi", "verdict"]
QUALITY_COLUMNS = ["model", "sampler", "family", "quality", "criterion", "threshold", "label", "setting",
                   "macs_speedup", "psnr_to_full", "d_fid", "d_fid_lo", "d_fid_hi"]
#: a table's floats in the CSV: enough digits for every reported number, and the same text on every run
FLOAT_FORMAT = "%.6g"


def write_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`tokencache.io.write_atomic`)."""
    from tokencache.io import write_atomic as write

    write(path, text)


# ---------------------------------------------------------------------------------- inputs


def run_key(path) -> tuple[str, str, str]:
    """(model id, sampler, run label) of ``runs/<model>/<sampler>/<label>/<file>``."""
    parts = Path(path).parts
    return parts[-4], parts[-3], parts[-2]


def family_of(label: str):
    """The family of a tuned run's label; None for a hand-picked label (tokencache.tuning.split_label)."""
    from tokencache.tuning import split_label

    return split_label(label)[0]


def slug_of(label: str) -> str:
    """The tuned knobs of a run's label, the short name of its setting."""
    from tokencache.tuning import split_label

    return split_label(label)[1]


def tuned_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The tuned runs of the main table, each with its ``family``, in a fixed order.

    main.csv names a run's label ``method``; here it is ``label``, and ``family`` groups the
    points of one search space (several families can share a cache method).
    """
    table = table.drop(columns=["note"], errors="ignore").rename(columns={"method": "label"})
    families = [family_of(str(label)) for label in table.label]
    tuned = table.assign(family=families)[[f is not None for f in families]]
    return tuned.sort_values(["model", "sampler", "family", "macs_speedup", "label"]).reset_index(drop=True)


def resamples_asked(r) -> bool:
    """Whether a run's evaluation was asked for bootstrap resamples (main.csv's ``bootstrap_resamples``)."""
    n = r.get("bootstrap_resamples")
    return n is not None and pd.notna(n) and float(n) > 0


def bootstrap_values(tuned: pd.DataFrame, bootstrap, table_csv) -> dict:
    """Per-resample values of every tuned run, by (model, sampler, label).

    A run evaluated with resamples must have its file among ``bootstrap``: without it a tie could
    not be told from a loss, so a missing one stops the script with one line naming the file
    (where it would be: ``runs/`` beside ``tables/``).
    """
    paths = {run_key(p): Path(p) for p in bootstrap}
    runs_root = Path(table_csv).parent.parent / "runs"
    values = {}
    for _, r in tuned.iterrows():
        key = (r.model, r.sampler, r.label)
        file = paths.get(key, runs_root.joinpath(*key, "metrics.bootstrap.npz"))
        if key in paths and file.is_file():
            with np.load(file) as data:
                values[key] = {k: data[k] for k in data.files}
        elif resamples_asked(r):
            raise ValueError(f"{file}: no bootstrap values for tuned run {'/'.join(key)}, evaluated with "
                             f"{int(r.bootstrap_resamples)} resamples (list it in the rule's input.bootstrap, or "
                             f"evaluate the run again)")
    return values


# ---------------------------------------------------------------------------------- budget table


def reaches(speedup: float, budget: float) -> bool:
    """Whether a point's MACs speed-up meets the budget (ratios of MAC counts: a relative tolerance)."""
    return speedup >= budget * (1.0 - TOLERANCE)


def ranking(criterion: str):
    """Sort key of points for ``criterion``: best value first, then the faster, then by label."""
    lower_is_better = CRITERIA[criterion][0]

    def key(r):
        value = float(r[criterion])
        return (value if lower_is_better else -value, -float(r.macs_speedup), str(r.label))

    return key


def best_point(points: pd.DataFrame, criterion: str, budget: float):
    """A family's best point (by ``criterion``) among those reaching ``budget``; None when none does."""
    eligible = [r for _, r in points.iterrows() if reaches(float(r.macs_speedup), budget) and pd.notna(r[criterion])]
    return min(eligible, key=ranking(criterion)) if eligible else None


def paired_difference(values: dict, key: tuple, winner_key: tuple, criterion: str, point: float) -> tuple:
    """95% interval of (run − winner) for ``criterion``, resample by resample; (nan, nan) without values.

    Both runs were evaluated on the same samples' noise and labels and resampled with the same
    index sets (checked through their digest), so the difference is paired
    (:func:`tokencache.metrics.bootstrap.paired_interval`), re-centred on the difference of the
    point estimates as the main table's paired intervals are.
    """
    from tokencache.metrics.bootstrap import paired_interval

    a, b = values.get(key, {}), values.get(winner_key, {})
    name = f"values_{criterion}"
    if name not in a or name not in b:
        return math.nan, math.nan
    if str(a.get("indices_sha256")) != str(b.get("indices_sha256")):
        raise ValueError(f"{'/'.join(key)} and {'/'.join(winner_key)} were resampled with different index sets "
                         f"(other seed or sample count): their difference cannot be paired")
    bounds = paired_interval(a[name], b[name], point=point)
    return (math.nan, math.nan) if bounds is None else tuple(bounds)


def verdict(lo: float, hi: float) -> str:
    """``tied`` when the paired interval contains 0, else ``behind``; ``no-interval`` without one."""
    if math.isnan(lo) or math.isnan(hi):
        return "no-interval"
    return "tied" if lo <= 0.0 <= hi else "behind"


def point_columns(r, criterion: str) -> dict:
    """The chosen point's own columns: label, setting, speed-up, the criterion with its interval, ΔFID, PSNR."""
    carried = ["d_fid", "d_fid_lo", "d_fid_hi", "psnr_to_full", "psnr_to_full_lo", "psnr_to_full_hi"]
    return {"label": r.label, "setting": r.get("setting"), "macs_speedup": r.macs_speedup, "value": r[criterion],
            "value_lo": r.get(f"{criterion}_lo"), "value_hi": r.get(f"{criterion}_hi"),
            **{c: r.get(c) for c in carried}}


def budget_rows(points: pd.DataFrame, values: dict, criterion: str, budget: float) -> list[dict]:
    """One row per family of one (model, sampler) at one budget: its best point and its verdict."""
    best = {family: best_point(part, criterion, budget) for family, part in points.groupby("family", sort=True)}
    reached = [r for r in best.values() if r is not None]
    winner = min(reached, key=ranking(criterion)) if reached else None
    rows = []
    for family, r in best.items():
        row = {"family": family}
        if r is None:
            row["verdict"] = "unreached"
        elif r.label == winner.label:
            row.update(point_columns(r, criterion), diff_to_winner=0.0, diff_lo=0.0, diff_hi=0.0, verdict="winner")
        else:
            diff = float(r[criterion]) - float(winner[criterion])
            lo, hi = paired_difference(values, (r.model, r.sampler, r.label),
                                       (winner.model, winner.sampler, winner.label), criterion, diff)
            row.update(point_columns(r, criterion), diff_to_winner=diff, diff_lo=lo, diff_hi=hi,
                       verdict=verdict(lo, hi))
        rows.append(row)
    return rows


def budget_table(tuned: pd.DataFrame, values: dict, budgets) -> pd.DataFrame:
    """The budget table: every (model, sampler), criterion, budget and family (columns :data:`BUDGET_COLUMNS`)."""
    rows = []
    for (model, sampler), points in tuned.groupby(["model", "sampler"], sort=True):
        for criterion in CRITERIA:
            for budget in sorted({float(b) for b in budgets}):
                for row in budget_rows(points, values, criterion, budget):
                    rows.append({"model": model, "sampler": sampler, "criterion": criterion, "budget": budget, **row})
    return pd.DataFrame(rows).reindex(columns=BUDGET_COLUMNS)


# ---------------------------------------------------------------------------------- quality budgets


def quality_budgets(psnr_budgets, fid_budget) -> list[tuple[str, str, float]]:
    """(name, criterion, threshold) of each quality budget: the PSNR budgets, then the FID budget."""
    found = [(f"psnr_to_full>={float(p):g}", "psnr_to_full", float(p)) for p in psnr_budgets or []]
    if fid_budget is not None:
        found.append((f"d_fid_hi<={float(fid_budget):g}", "d_fid_hi", float(fid_budget)))
    return found


def qualifies(r, criterion: str, threshold: float) -> bool:
    """PSNR to full (point estimate) at least the budget, or ΔFID's upper 95% end at most it.

    The FID budget asks that the data exclude a loss larger than the budget, so a point without
    a paired interval (evaluated without resamples) never qualifies.
    """
    value = r.get(criterion)
    if value is None or pd.isna(value):
        return False
    return value >= threshold if criterion == "psnr_to_full" else value <= threshold


def fastest_within(points: pd.DataFrame, criterion: str, threshold: float):
    """The point with the largest MACs speed-up that meets the quality budget; None when none does."""
    eligible = [r for _, r in points.iterrows() if qualifies(r, criterion, threshold)]
    return min(eligible, key=lambda r: (-float(r.macs_speedup), str(r.label))) if eligible else None


def quality_table(tuned: pd.DataFrame, psnr_budgets, fid_budget) -> pd.DataFrame:
    """One row per (model, sampler, family, quality budget): the fastest point within it, or empty."""
    rows = []
    for (model, sampler, family), points in tuned.groupby(["model", "sampler", "family"], sort=True):
        for name, criterion, threshold in quality_budgets(psnr_budgets, fid_budget):
            row = {"model": model, "sampler": sampler, "family": family, "quality": name, "criterion": criterion,
                   "threshold": threshold}
            r = fastest_within(points, criterion, threshold)
            if r is not None:
                row.update({k: r.get(k) for k in ("label", "setting", "macs_speedup", "psnr_to_full", "d_fid",
                                                  "d_fid_lo", "d_fid_hi")})
            rows.append(row)
    return pd.DataFrame(rows).reindex(columns=QUALITY_COLUMNS)


# ---------------------------------------------------------------------------------- Markdown


def signed(value: float) -> str:
    """``+0.12`` / ``−0.05`` (a true minus sign), three significant digits."""
    return f"{value:+.3g}".replace("-", "−")


def plain(value: float, digits: int = 3) -> str:
    """A number with ``digits`` significant digits and a true minus sign."""
    return f"{value:.{digits}g}".replace("-", "−")


def speedup_text(value: float) -> str:
    return f"{value:.3g}×"


def quality_text(r, criterion: str) -> str:
    """ΔFID vs full with its paired interval, or PSNR to full with its interval (dB)."""
    if criterion == "fid":
        d, lo, hi = r.get("d_fid"), r.get("d_fid_lo"), r.get("d_fid_hi")
        if d is None or pd.isna(d):
            return "n/a"
        return signed(d) + (f" [{plain(lo)}, {plain(hi)}]" if pd.notna(lo) and pd.notna(hi) else "")
    v, lo, hi = r.get("psnr_to_full"), r.get("psnr_to_full_lo"), r.get("psnr_to_full_hi")
    if v is None or pd.isna(v):
        return "n/a"
    return plain(v, 4) + (f" [{plain(lo, 4)}, {plain(hi, 4)}]" if pd.notna(lo) and pd.notna(hi) else "")


def budget_cell(r, criterion: str) -> str:
    """A matrix cell: the criterion at the family's chosen point and its speed-up, marked by verdict."""
    if r.verdict == "unreached":
        return "—"
    text = f"{quality_text(r, criterion)} @{speedup_text(r.macs_speedup)}"
    return {"winner": f"**{text}**", "tied": f"≈ {text}"}.get(r.verdict, text)


def winner_text(rows: pd.DataFrame) -> str:
    """``winner (tied, …)`` of one budget; — when no family reaches it."""
    winner = rows[rows.verdict == "winner"].family.tolist()
    if not winner:
        return "—"
    tied = rows[rows.verdict == "tied"].family.tolist()
    return winner[0] + (f" ({', '.join(tied)})" if tied else "")


#: the marks of a budget matrix, under each table
MARKS = ("**Bold**: the winner; ≈: tied with it (the paired 95% interval of the difference contains 0); plain: "
         "behind (or evaluated without resamples: no interval to tell); —: no tuned point reaches the budget.")
LEGEND = {
    "fid": ("Cell: ΔFID vs no caching [paired 95% interval] @ the MACs speed-up of the family's lowest-FID "
            "tuned point with speed-up ≥ the budget. " + MARKS),
    "psnr_to_full": ("Cell: PSNR to the uncached images, dB [95% interval] @ the MACs speed-up of the family's "
                     "highest-PSNR tuned point with speed-up ≥ the budget. " + MARKS),
}
QUALITY_LEGEND = ("Cell: the largest MACs speed-up among the family's evaluated tuned points within the quality "
                  "budget (mean PSNR to the uncached images, point estimate; or the upper end of the paired 95% "
                  "interval of ΔFID vs no caching), with the point's tuned setting. **Bold**: the fastest family "
                  "per column; —: no point qualifies.")


def budget_markdown(table: pd.DataFrame) -> str:
    """budgets.md: one matrix per (model, sampler, criterion), budgets as rows, families as columns."""
    parts = []
    for (model, sampler), scope in table.groupby(["model", "sampler"], sort=True):
        for criterion, (lower_is_better, name) in CRITERIA.items():
            part = scope[scope.criterion == criterion]
            families = sorted(part.family.unique())
            rows = []
            for budget, at in part.groupby("budget", sort=True):
                cells = {r.family: budget_cell(r, criterion) for _, r in at.iterrows()}
                rows.append({"MACs speed-up ≥": speedup_text(budget), **{f: cells[f] for f in families},
                             "winner (tied)": winner_text(at)})
            better = "lower" if lower_is_better else "higher"
            parts.append(f"### {model} · {sampler} · {name} ({better} is better)\n\n"
                         + pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)
                         + f"\n\n{LEGEND[criterion]}\n")
    return "\n".join(parts)


def quality_header(criterion: str, threshold: float) -> str:
    """A column of quality_budgets.md: the budget in words."""
    if criterion == "psnr_to_full":
        return f"PSNR ≥ {threshold:g} dB"
    return f"ΔFID ≤ {threshold:g} (upper 95%)"


def quality_markdown(table: pd.DataFrame) -> str:
    """quality_budgets.md: per (model, sampler), families as rows, the fastest point per quality budget."""
    parts = []
    for (model, sampler), scope in table.groupby(["model", "sampler"], sort=True):
        budgets = list(dict.fromkeys(zip(scope.quality, scope.criterion, scope.threshold)))
        best = {name: scope[scope.quality == name].macs_speedup.max() for name, _, _ in budgets}
        rows = []
        for family, part in scope.groupby("family", sort=True):
            row = {"family": family}
            for name, criterion, threshold in budgets:
                r = part[part.quality == name].iloc[0]
                cell = "—"
                if pd.notna(r.macs_speedup):
                    cell = f"{speedup_text(r.macs_speedup)} ({slug_of(r.label)})"
                    cell = f"**{cell}**" if r.macs_speedup == best[name] else cell
                row[quality_header(criterion, threshold)] = cell
            rows.append(row)
        matrix = pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)
        parts.append(f"### {model} · {sampler}\n\n{matrix}\n\n{QUALITY_LEGEND}\n")
    return "\n".join(parts)


def headline_budget(budgets) -> float:
    """The budget the headline reports: 2×, or the configured one nearest to it (the smaller on a tie)."""
    return min((float(b) for b in budgets), key=lambda b: (abs(b - HEADLINE_BUDGET), b))


def families_text(rows: pd.DataFrame, which: str) -> str:
    names = rows[rows.verdict == which].family.tolist()
    return ", ".join(names) if names else "none"


def headline_sentence(model: str, sampler: str, criterion: str, budget: float, rows: pd.DataFrame) -> str:
    """One sentence: who wins at the budget, its quality vs no caching, who is tied, behind, or too slow."""
    start = f"{model}, {sampler}, at ≥ {budget:g}× MACs speed-up: "
    winners = rows[rows.verdict == "winner"]
    if winners.empty:
        return start + "no tuned point reaches this budget."
    w = winners.iloc[0]
    if criterion == "fid":
        claim = f"keeps FID best (ΔFID {quality_text(w, criterion)} vs no caching"
    else:
        claim = f"stays closest to the uncached images (PSNR {quality_text(w, criterion)} dB to no caching"
    text = (f"{start}**{w.family}** ({w.label}, {speedup_text(w.macs_speedup)}) {claim}; "
            f"tied: {families_text(rows, 'tied')}; behind: {families_text(rows, 'behind')}")
    for which, name in (("no-interval", "without intervals"), ("unreached", f"not reaching {budget:g}×")):
        if (rows.verdict == which).any():
            text += f"; {name}: {families_text(rows, which)}"
    return text + ")."


def headline(table: pd.DataFrame, budgets) -> str:
    """headline.md: per (model, sampler), the FID sentence and the PSNR sentence at the headline budget."""
    budget = headline_budget(budgets)
    sentences = []
    for (model, sampler), scope in table.groupby(["model", "sampler"], sort=True):
        for criterion in CRITERIA:
            rows = scope[(scope.criterion == criterion) & (scope.budget == budget)]
            sentences.append(headline_sentence(model, sampler, criterion, budget, rows))
    return "\n\n".join(sentences) + "\n"


# ---------------------------------------------------------------------------------- output


def titled(banner: str, table: pd.DataFrame = None, markdown: str = None):
    """A table or its Markdown under ``banner`` (a rehearsal's "stand-in weights" line), as tables.py
    does: a first ``note`` column of the CSV, a bold first line of the Markdown."""
    if not banner:
        return table if markdown is None else markdown
    if markdown is not None:
        return f"**{banner}**\n\n{markdown}"
    return table.assign(note=banner)[["note", *table.columns]]


def csv_text(table: pd.DataFrame) -> str:
    return table.to_csv(index=False, float_format=FLOAT_FORMAT, lineterminator="\n")


def write_empty(out: dict, banner: str) -> None:
    """Every output as one line saying that there are no tuned runs (not an error: tuning is optional)."""
    note = pd.DataFrame({"note": [f"{banner} — {NO_TUNED}" if banner else NO_TUNED]})
    for name in ("csv", "quality_csv"):
        write_atomic(out[name], csv_text(note))
    for name in ("md", "quality_md", "headline"):
        write_atomic(out[name], titled(banner, markdown=NO_TUNED + "\n"))


def main(table_csv, bootstrap, out: dict, budgets=None, psnr_budgets=(30, 35), fid_budget=0.5,
         banner: str = "") -> None:
    """Write the budget tables, the quality-budget tables and the headline (``out``: output name → path)."""
    budgets = list(budgets) if budgets else list(DEFAULT_BUDGETS)
    tuned = tuned_rows(pd.read_csv(table_csv))
    if tuned.empty:
        write_empty(out, banner)
        return
    values = bootstrap_values(tuned, [bootstrap] if isinstance(bootstrap, str) else list(bootstrap), table_csv)
    table = budget_table(tuned, values, budgets)
    quality = quality_table(tuned, psnr_budgets, fid_budget)
    write_atomic(out["csv"], csv_text(titled(banner, table)))
    write_atomic(out["md"], titled(banner, markdown=budget_markdown(table)))
    write_atomic(out["quality_csv"], csv_text(titled(banner, quality)))
    write_atomic(out["quality_md"], titled(banner, markdown=quality_markdown(quality)))
    write_atomic(out["headline"], titled(banner, markdown=headline(table, budgets)))


if __name__ == "__main__" and "snakemake" in globals():
    sm = snakemake  # noqa: F821
    main(sm.input.table, sm.input.get("bootstrap", []), {name: getattr(sm.output, name) for name in OUTPUTS},
         budgets=sm.params.get("budgets") or DEFAULT_BUDGETS, psnr_budgets=sm.params.get("psnr_budgets") or [],
         fid_budget=sm.params.get("fid_budget"), banner=sm.params.get("banner", ""))
