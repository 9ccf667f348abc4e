#!/usr/bin/env bash
# The H200 latency measurement in one command, sized to a short GPU window (≤ 8 minutes; the
# estimate is in README.md here). In order: the CUDA-only tests; DiT-XL/2 DDIM-50 in bfloat16
# (weights cast) at batch 8 and 64, every registered method at its defaults, eager and then
# torch.compile'd; MDTv2-XL/2 DDIM-50 bfloat16 at batch 64, eager; the report. Random weights and
# random calibration stand-ins: the cost of a method does not depend on them (README.md).
#
#   bash results/gpu/run.sh             # on the GPU machine, from anywhere in the repository
#   bash results/gpu/run.sh --dry-run   # anywhere: CPU, the tiny digits presets, everything shrunk
#
# Writes the latency JSON of each pass, latency.{csv,md}, realization_ratio.png and run.log into
# $RESULTS (default results/gpu/h200, or results/gpu/dry-run), copies them into $OUT when that is
# set (e.g. a folder a remote runner copies back), and prints the short table as its last lines. A pass that
# would start after $BUDGET_S seconds (default 390) is skipped and the log says so, so that the
# whole run ends inside the window.
set -euo pipefail
cd "$(dirname "$0")/../.."

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-390}
if [ "$DRY" = 1 ]; then
  RESULTS=${RESULTS:-results/gpu/dry-run}
  DEVICE=cpu; DIT=DiT-digits; MDT=MDTv2-digits; SAMPLER=ddim3; SMALL=1; LARGE=2; REPEATS=1; BACKEND=eager
else
  RESULTS=${RESULTS:-results/gpu/h200}
  DEVICE=cuda; DIT=DiT-XL/2; MDT=MDTv2-XL/2; SAMPLER=ddim50; SMALL=8; LARGE=64; REPEATS=2; BACKEND=inductor
fi
mkdir -p "$RESULTS"
LOG="$RESULTS/run.log"
: >"$LOG"
START=$SECONDS
say() { echo "[run.sh $((SECONDS - START)) s] $*" | tee -a "$LOG"; }
within_budget() {
  if [ $((SECONDS - START)) -gt "$BUDGET_S" ]; then
    say "skipped: $1 (past the ${BUDGET_S} s budget)"
    return 1
  fi
}

if ! "$PY" -c "import tokencache.baselines" 2>/dev/null; then  # a fresh machine: this checkout, no download
  say "installing tokencache from this checkout (no dependencies, no index)"
  "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . >>"$LOG" 2>&1 ||
    { say "could not install tokencache with $PY (set PYTHON=…): see $LOG"; exit 1; }
fi
"$PY" - <<'EOF' | tee -a "$LOG"
import platform, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, {gpu}")
EOF

say "CUDA-only tests"
set +e
OMP_NUM_THREADS=4 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_gpu.py tests/test_latency.py 2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
set -e
if [ "$status" != 0 ] && [ "$status" != 5 ]; then  # 5: none collected (no CUDA here: the dry run)
  say "CUDA tests failed (exit $status): timing anyway, read the log"
fi

COMMON=(--sampler "$SAMPLER" --device "$DEVICE" --dtype bfloat16 --cast-weights --repeats "$REPEATS" --warmup 1
        --method all --random-calibration "$RESULTS/calibration" --quiet)
say "DiT eager: batch $SMALL and $LARGE, every method"
"$PY" -m tokencache latency --model "$DIT" --cfg-scale 1.5 --batch-sizes "$SMALL" "$LARGE" "${COMMON[@]}" \
  --out "$RESULTS/dit_eager.json" >>"$LOG" 2>&1
if within_budget "DiT compiled"; then
  say "DiT torch.compile (default mode): batch $SMALL and $LARGE, every method"
  "$PY" -m tokencache latency --model "$DIT" --cfg-scale 1.5 --batch-sizes "$SMALL" "$LARGE" "${COMMON[@]}" \
    --compile default --compile-backend "$BACKEND" --no-decision-timing --out "$RESULTS/dit_compiled.json" >>"$LOG" 2>&1
fi
if within_budget "MDTv2 eager"; then
  say "MDTv2 eager: batch $LARGE, every method"
  "$PY" -m tokencache latency --model "$MDT" --cfg-scale 3.8 --scale-pow 4 --batch-sizes "$LARGE" "${COMMON[@]}" \
    --no-decision-timing --out "$RESULTS/mdt_eager.json" >>"$LOG" 2>&1
fi

say "report"
"$PY" -m tokencache latency-report "$RESULTS"/*.json --out-dir "$RESULTS" >"$RESULTS/short.txt" 2>>"$LOG"
say "done in $((SECONDS - START)) s"
if [ -n "${OUT:-}" ]; then
  cp "$RESULTS"/*.json "$RESULTS"/latency.csv "$RESULTS"/latency.md "$RESULTS"/realization_ratio.png "$LOG" "$OUT"/
fi
cat "$RESULTS/short.txt"
