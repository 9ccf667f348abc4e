# Reporting stage: tables and plots read only the small JSON/CSV files of the runs (and, for the
# calibration figures, the calibration files). Everything marked report(...) goes into
# `snakemake --report report.html`, under its category, with the caption in workflow/report/.


rule tables:
    input:
        metrics=[f"{d}/metrics.json" for d in run_dirs()],
        runs=[f"{d}/run.json" for d in run_dirs()],
        bootstrap=[f"{d}/metrics.bootstrap.npz" for d in run_dirs()],  # the paired intervals' values
        timings=[f"{d}/run.provenance.json" for d in run_dirs()],  # the latency table's sampling seconds
        # the tuning stage's front points: known once each front is selected (a checkpoint), so apart
        # from the configured runs, which a dry run lists before any tuning
        tuned_metrics=lambda w: [f"{d}/metrics.json" for d in tuned_run_dirs()],
        tuned_runs=lambda w: [f"{d}/run.json" for d in tuned_run_dirs()],
        tuned_bootstrap=lambda w: [f"{d}/metrics.bootstrap.npz" for d in tuned_run_dirs()],
        tuned_timings=lambda w: [f"{d}/run.provenance.json" for d in tuned_run_dirs()],
        reported=config["reported"],
    output:
        csv=report(f"{RESULTS}/tables/main.csv", category="Tables", caption="../report/main_table.rst"),
        md=f"{RESULTS}/tables/main.md",
        tex=f"{RESULTS}/tables/main.tex",
        ablation_csv=report(f"{RESULTS}/tables/ablation.csv", category="Tables",
                            caption="../report/ablation_table.rst"),
        ablation_md=f"{RESULTS}/tables/ablation.md",
        # volatile (tokencache.results.VOLATILE): this machine's seconds, apart from the deterministic tables
        latency_csv=report(f"{RESULTS}/tables/latency.csv", category="Tables", caption="../report/latency_table.rst"),
        latency_md=f"{RESULTS}/tables/latency.md",
    params:
        ablation_labels=ablation_labels(),
        banner=STAND_IN_BANNER,
    log:
        f"{RESULTS}/logs/tables.log",
    script:
        "../scripts/tables.py"


if TUNING:

    rule budget_tables:
        # which method wins at each MACs speed-up budget (and the speed-up each reaches within a quality budget)
        input:
            table=rules.tables.output.csv,
            bootstrap=lambda w: [f"{d}/metrics.bootstrap.npz" for d in run_dirs(["full"]) + tuned_run_dirs()],
        output:
            csv=report(budget_outputs()["csv"], category="Tables", caption="../report/budgets.rst"),
            md=budget_outputs()["md"],
            quality_csv=report(budget_outputs()["quality_csv"], category="Tables",
                               caption="../report/quality_budgets.rst"),
            quality_md=budget_outputs()["quality_md"],
            headline=budget_outputs()["headline"],
        params:
            budgets=FRONT_SELECTION["budgets"],
            psnr_budgets=TUNING.get("psnr_budgets", [30, 35]),
            fid_budget=TUNING.get("fid_budget", 0.5),
            banner=STAND_IN_BANNER,
        log:
            f"{RESULTS}/logs/budget_tables.log",
        script:
            "../scripts/budgets.py"


PLOT_CAPTIONS = {
    "pareto_macs": "pareto.rst",
    "pareto_latency": "pareto.rst",
    "pareto_psnr": "pareto_psnr.rst",
    "macs_vs_fid": "macs_vs_fid.rst",
    "token_fraction": "token_fraction.rst",
    "calibration": "calibration.rst",
    "tuning": "tuning.rst",
}


rule plots:
    input:
        table=rules.tables.output.csv,
        latency=rules.tables.output.latency_csv,
        runs=[f"{d}/run.json" for d in run_dirs()],
        tuned_runs=lambda w: [f"{d}/run.json" for d in tuned_run_dirs()],
        calibrations=calibration_files(),
        fronts=front_files(),
    output:
        **{name: report(path, category="Plots", caption=f"../report/{PLOT_CAPTIONS[name]}")
           for name, path in plot_outputs().items()},
    params:
        banner=STAND_IN_BANNER,
    log:
        f"{RESULTS}/logs/plots.log",
    script:
        "../scripts/plots.py"


rule sample_grid:
    input:
        npz=[f"{d}/samples.npz" for d in run_dirs()],
        tuned_npz=lambda w: [f"{d}/samples.npz" for d in grid_front_dirs()],
    output:
        png=report(f"{RESULTS}/plots/samples_grid.png", category="Samples", caption="../report/samples_grid.rst"),
    params:
        n=config.get("grid_samples", 20),
        banner=STAND_IN_BANNER,
    log:
        f"{RESULTS}/logs/sample_grid.log",
    script:
        "../scripts/sample_grid.py"


# Targets of a stage, for `snakemake sampled` / `snakemake evaluated` (workflow/scripts/stage_times.sh):
# every configured run and every tuned front point (which `--until` would not reach: the tables ask
# for them through the fronts)
rule sampled:
    input:
        [f"{d}/run.json" for d in run_dirs()],
        lambda w: [f"{d}/run.json" for d in tuned_run_dirs()],


rule evaluated:
    input:
        [f"{d}/metrics.json" for d in run_dirs()],
        lambda w: [f"{d}/metrics.json" for d in tuned_run_dirs()],
