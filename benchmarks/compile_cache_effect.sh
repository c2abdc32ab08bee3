#!/usr/bin/env bash
# The persistent compilation cache's effect on one test file: tests/test_train.py without the
# cache, then twice with a fresh one (the first run fills it, the second reads it).
#   bash benchmarks/compile_cache_effect.sh   -> benchmarks/results/compile-cache.txt
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=benchmarks/results/compile-cache.txt
CACHE=$(mktemp -d)
trap 'rm -rf "$CACHE"' EXIT
run() {  # label, LAB_COMPILATION_CACHE value
  local start end
  start=$(date +%s.%N)
  LAB_COMPILATION_CACHE=$2 "$PY" -m pytest -q -p no:cacheprovider tests/test_train.py >/dev/null
  end=$(date +%s.%N)
  printf '%-22s %8.1f s\n' "$1" "$(echo "$end - $start" | bc)"
}
{
  echo "tests/test_train.py, $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ), load $(cut -d' ' -f1 /proc/loadavg)"
  run "cache off" 0
  run "cache cold (filling)" "$CACHE"
  run "cache warm" "$CACHE"
  echo "entries: $(ls "$CACHE" | grep -c -- '-cache$'), $(du -sh "$CACHE" | cut -f1)"
} | tee "$OUT"
