#!/usr/bin/env bash
# The GPU tier, measured on a machine with onnxruntime-gpu (CUDA) and NVML:
#   bash scripts/gpu_tier.sh OUTDIR
# writes OUTDIR/info.txt, the device profile (batches 1 and 4, NVML power), a
# CPU profile of the same host for the ratio, `abcd-edge run --requests` reports
# at latency and energy budgets, and the runtime bench (quiet) on ort-cuda.
set -uo pipefail   # not -e: a refused budget is a finding; carry on with the next step
OUTDIR=${1:?usage: scripts/gpu_tier.sh OUTDIR}
PY=${PYTHON:-python3}
BACKEND=${BACKEND:-ort-cuda}   # overridable to try the script on a CPU-only machine
POWER=${POWER:-nvml}
REQUESTS=${REQUESTS:-1000}
mkdir -p "$OUTDIR"
cli() { "$PY" -m abcd_edge.cli.main "$@" || echo "abcd-edge $1 exited with $?"; }

cli info | tee "$OUTDIR/info.txt"
cli profile --backend "$BACKEND" --batch 1,4 --runs 500 --power "$POWER" --out "$OUTDIR/profile-$BACKEND.json"
cli profile --backend ort-cpu --threads 8 --batch 1 --runs 300 --power none --out "$OUTDIR/profile-ort-cpu-8t.json"
for budget in 5ms 10ms 20ms 50ms; do
  cli run --backend "$BACKEND" --profile "$OUTDIR/profile-$BACKEND.json" --power "$POWER" --budget "$budget" \
      --requests "$REQUESTS" --out "$OUTDIR/run-$budget.png" --report "$OUTDIR/run-$budget.json"
done
# Energy budget: needs the NVML meter (refused on machines without one).
cli run --backend "$BACKEND" --profile "$OUTDIR/profile-$BACKEND.json" --power "$POWER" --budget 2J \
    --requests $((REQUESTS / 5 + 1)) --out "$OUTDIR/run-2J.png" --report "$OUTDIR/run-2J.json"
cli bench-runtime --backend "$BACKEND" --profile "$OUTDIR/profile-$BACKEND.json" --loads quiet \
    --budgets 10ms,20ms,50ms --requests "$REQUESTS" --out "$OUTDIR/runtime-bench"
