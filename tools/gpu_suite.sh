#!/usr/bin/env bash
# One device call: the GPU tests, then the benchmarks; logs under $OUT (or ./gpu_out).
# Usage: bash tools/gpu_suite.sh [tests|bench|all] [extra args for bench_decode.py]
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-/opt/tiktoken_cache}
what=${1:-all}
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
git rev-parse --short HEAD > "$OUT/commit.txt" 2>/dev/null
if [ "$what" = tests ] || [ "$what" = all ]; then
  timeout 200 python -m pytest -q -p no:cacheprovider -rfE tests/gpu/test_model.py > "$OUT/test_model.log" 2>&1
  echo "test_model rc=$?" >> "$OUT/summary.txt"
  timeout 240 python -m pytest -q -p no:cacheprovider -rfE tests/gpu --ignore=tests/gpu/test_model.py > "$OUT/test_kernels.log" 2>&1
  echo "test_kernels rc=$?" >> "$OUT/summary.txt"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  shift || true
  timeout 300 python benchmarks/bench_decode.py --json "$OUT/decode.json" "$@" > "$OUT/bench_decode.log" 2>&1
  echo "bench_decode rc=$?" >> "$OUT/summary.txt"
fi
tail -3 "$OUT"/*.log
cat "$OUT/summary.txt"
