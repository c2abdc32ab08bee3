#!/usr/bin/env bash
# The lab on one NVIDIA H100/H200, in at most 8 minutes: each piece of benchmarks/device_check.py
# under its own `timeout`, the raw output under benchmarks/results/device-check-DATE/, then a
# table. Installs nothing from the internet but the cuda12 extra (pip install -e '.[cuda12]'),
# and that only when the installed jax sees no GPU (any CUDA plugin that does is used as it is).
#   bash benchmarks/device_check.sh            # on the GPU machine
#   SMOKE=1 bash benchmarks/device_check.sh    # small, on the CPU: checks the script only
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=benchmarks/results/device-check-$(date -u +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
FLAGS=()
if [ -n "${SMOKE:-}" ]; then
  FLAGS=(--smoke)
  export JAX_PLATFORMS=cpu
elif ! "$PY" -c 'import jax; assert jax.default_backend() == "gpu"' 2>/dev/null; then
  timeout 120 "$PY" -m pip install --quiet -e '.[cuda12]' || { echo "install failed"; exit 1; }
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  "$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())'; } > "$OUT/env.txt" 2>&1
# seconds per piece: 100 + 70 + 150 + 140 = 460, leaving a minute for start-up and the install
for piece in throughput:100 attention:70 muon:150 resume:140; do
  name=${piece%%:*}
  echo "--- $name (at most ${piece##*:} s)"
  timeout -s KILL "${piece##*:}" "$PY" benchmarks/device_check.py "$name" "$OUT" "${FLAGS[@]}" \
    > "$OUT/$name.log" 2>&1
  echo "exit status $? (log: $OUT/$name.log)"
done
"$PY" benchmarks/device_check.py table "$OUT" | tee "$OUT/table.txt"
