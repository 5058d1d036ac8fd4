#!/usr/bin/env bash
# The serving benchmark on one GPU, for BENCHMARKS.md: run.py -m serve on random gpt-oss-20b weights,
# driven by bench_serve at concurrency 1, 64, 256 and 1024 (1,000-token prompts of random ids, 256 new
# tokens each, ignore_eos), then run.py -m getp on the prompts of the 1,024 run (the same ids and new
# tokens) for the served / getp ratio. About 5-6 minutes on an H200 (two model loads included).
#
#   bash benchmarks/serve_device.sh OUT_DIR [MODEL]        # MODEL default synthetic:gpt-oss-20b
#
# Writes OUT_DIR/serve.json (every run: throughput, TTFT/TPOT median and p99, the server's step
# counters; getp's record and the ratio), OUT_DIR/serve.txt (the printed reports and the summary
# table), OUT_DIR/getp/ (prompts.ids, getp's output and record) and OUT_DIR/env.txt. Needs fastapi,
# uvicorn, httpx2 (the openai package's HTTP client) and openai-harmony importable (PYTHONPATH).
set -euo pipefail
OUT=${1:?usage: serve_device.sh OUT_DIR [MODEL]}
MODEL=${2:-synthetic:gpt-oss-20b}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
{
  git rev-parse --short HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader 2>/dev/null || true
  python - <<'EOF'
import importlib
for name in ("fastapi", "uvicorn", "httpx2", "openai_harmony", "uvloop", "httptools"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"))
    except ImportError:
        print(name, "missing" + ("" if name in ("uvloop", "httptools") else "  <- needed"))
EOF
  nproc
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
# (DEVICE, CONCURRENCY, NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN override the run's shape: a CPU check of this script)
python benchmarks/bench_serve.py --model "$MODEL" --device "${DEVICE:-gpu}" \
  --concurrency "${CONCURRENCY:-1,64,256,1024}" --num-prompts "${NUM_PROMPTS:-8,256,512,1024}" \
  --input-len "${INPUT_LEN:-1000}" --output-len "${OUTPUT_LEN:-256}" \
  --getp --ids-out "$OUT/getp" --json "$OUT/serve.json" --force 2>&1 | tee "$OUT/serve.txt"
