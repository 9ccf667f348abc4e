# `snakemake --cores all` from the repository root runs the workflow in workflow/ on
# config/config.yaml (the digits testbed). Other configs: --configfile config/smoke.yaml.
include: "workflow/Snakefile"


rule default:
    input:
        rules.all.input,
    default_target: True
