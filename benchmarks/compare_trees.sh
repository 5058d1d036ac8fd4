#!/usr/bin/env bash
# Back to back on one GPU: this tree against another checkout of the project (a base commit), so that a
# speed claim compares two commits on the same machine. Writes each run's JSON record to OUT_DIR.
#   git archive BASE | tar -x -C .base        # the base tree (keep it out of git: .git/info/exclude)
#   bash benchmarks/compare_trees.sh .base OUT_DIR [getp|decode|all]
set -euo pipefail
base=${1:?usage: compare_trees.sh BASE_TREE OUT_DIR [getp|decode|all]}
out=${2:?usage: compare_trees.sh BASE_TREE OUT_DIR [getp|decode|all]}
what=${3:-all}
here=$(cd "$(dirname "$0")/.." && pwd)
base=$(cd "$base" && pwd)
mkdir -p "$out"
for f in getp_new getp_base decode_new decode_base; do  # the base tree's benchmarks may predate --force
  if [ -e "$out/$f.json" ]; then echo "compare_trees.sh: error: $out/$f.json exists; use another OUT_DIR" >&2; exit 2; fi
done
export PYTHONUNBUFFERED=1
for tree in "$here" "$base"; do
  name=$([ "$tree" = "$here" ] && echo new || echo base)
  if [ "$what" != decode ]; then
    echo "== $name: getp 20b, 2048 prompts x 1000 tokens, 1000 new"
    (cd "$tree" && python3 benchmarks/bench_getp.py --prompts 2048 --min-len 1000 --max-len 1000 -n 1000 \
       --json "$out/getp_$name.json")
  fi
  if [ "$what" != getp ]; then
    echo "== $name: decode batches 1, 64; prefill 1024"
    (cd "$tree" && python3 benchmarks/bench_decode.py --batches 1,64 --json "$out/decode_$name.json" \
       | grep -E "^(uploaded|prefill|decode batch)")
  fi
done
