# Reporting stage: tables and plots read only the small JSON files of the runs.


rule tables:
    input:
        metrics=[f"{d}/metrics.json" for d in run_dirs()],
        runs=[f"{d}/run.json" for d in run_dirs()],
    output:
        csv=report(f"{RESULTS}/tables/main.csv", category="Tables"),
        md=f"{RESULTS}/tables/main.md",
        tex=f"{RESULTS}/tables/main.tex",
    log:
        f"{RESULTS}/logs/tables.log",
    script:
        "../scripts/tables.py"


rule sample_grid:
    input:
        npz=[f"{d}/samples.npz" for d in run_dirs()],
    output:
        png=report(f"{RESULTS}/plots/samples_grid.png", category="Samples"),
    params:
        n=config.get("grid_samples", 20),
    log:
        f"{RESULTS}/logs/sample_grid.log",
    script:
        "../scripts/sample_grid.py"
