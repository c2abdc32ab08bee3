#!/usr/bin/env bash
# The lab on one NVIDIA H100/H200 in at most 8 minutes: the device sweep of the ~1B train step
# (benchmarks/device_sweep.py: the baseline configs/gpu/1b.yaml, then one change at a time, each
# variant in its own process under its own time limit, its row written as it finishes), then
# the table. The raw output goes under benchmarks/results/device-check-DATE/. Installs nothing
# from the internet but the cuda12 extra (pip install -e '.[cuda12]'), and that only when the
# installed jax sees no GPU (any CUDA plugin that does is used as it is).
#   bash benchmarks/device_check.sh            # the sweep, on the GPU machine (~7.5 minutes)
#   bash benchmarks/device_check.sh checks     # attention xla vs cudnn, SIGKILL + resume (~3.5)
#   SMOKE=1 bash benchmarks/device_check.sh    # small, on the CPU: checks the script only
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=benchmarks/results/device-check-$(date -u +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
FLAGS=()
BUDGET=440
if [ -n "${SMOKE:-}" ]; then
  FLAGS=(--smoke)
  BUDGET=3600
  export JAX_PLATFORMS=cpu
elif ! "$PY" -c 'import jax; assert jax.default_backend() == "gpu"' 2>/dev/null; then
  timeout 120 "$PY" -m pip install --quiet -e '.[cuda12]' || { echo "install failed"; exit 1; }
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  "$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())'; } > "$OUT/env.txt" 2>&1
if [ "${1:-sweep}" = checks ]; then
  # seconds per piece: 70 + 140
  for piece in attention:70 resume:140; do
    name=${piece%%:*}
    echo "--- $name (at most ${piece##*:} s)"
    timeout -s KILL "${piece##*:}" "$PY" benchmarks/device_check.py "$name" "$OUT" \
      "${FLAGS[@]}" > "$OUT/$name.log" 2>&1
    echo "exit status $? (log: $OUT/$name.log)"
  done
else
  # every variant is bounded by its own limit and all of them by the budget; the outer timeout
  # only guards the sweep's own start-up
  timeout -s KILL $((BUDGET + 40)) "$PY" benchmarks/device_check.py sweep "$OUT" \
    --budget "$BUDGET" "${FLAGS[@]}" 2>&1 | tee "$OUT/sweep.log"
fi
"$PY" benchmarks/device_check.py table "$OUT" | tee "$OUT/table.txt"
