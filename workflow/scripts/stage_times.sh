#!/usr/bin/env bash
# CPU-seconds of each stage of a default workflow run, measured with /usr/bin/time -v.
#
#   workflow/scripts/stage_times.sh NAME [KEY=VALUE …]      (config keys, e.g. threads=2)
#
# runs the workflow into results/NAME stage by stage (calibration, tuning, sampling, evaluation,
# then tables/plots/report) and prints, per stage, user+system CPU-seconds and wall-clock seconds. CPU
# time is the figure to compare on a shared machine; wall time only on an idle one. Environment
# variables (ATEN_CPU_CAPABILITY, …) pass through to every job.
set -euo pipefail
name=${1:?usage: stage_times.sh NAME [KEY=VALUE ...]}
shift
cd "$(dirname "$0")/../.."
logs=results/$name/logs
mkdir -p "$logs"
log=$logs/stage_times.txt
: > "$log"
stage() {
  local label=$1 report=$2
  /usr/bin/time -f "$label %U %S %e" -a -o "$log" snakemake --cores all "${@:3}" --config name="$name" report="$report" "${extra[@]}" \
    >/dev/null 2>"$logs/stage_$label.err" || { echo "stage $label failed: $logs/stage_$label.err" >&2; exit 1; }
}
extra=("$@")
stage calibration false --until calibrate
stage tuning false --until select_front
stage sampling false sampled
stage evaluation false evaluated
stage report true
awk '{cpu = $2 + $3; total += cpu; wall += $4; printf "%-12s %8.1f CPU-s %8.1f s wall\n", $1, cpu, $4}
     END {printf "%-12s %8.1f CPU-s %8.1f s wall\n", "total", total, wall}' "$log"
