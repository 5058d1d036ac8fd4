#!/usr/bin/env bash
# What evaluation/eval.py's METEOR needs on a fresh Debian machine (no GPU, no network beyond the
# package mirrors): Debian's WordNet 3.0, then a check that nltk reads it (evaluation/wordnet_setup.py
# copies it into .cache/nltk_data and writes the lexnames table the package leaves out).
# wordnet-sense-index adds index.sense, which nltk opens when it loads WordNet; without it the setup
# writes an empty one (METEOR never reads sense keys).
# Python packages: pip install -r requirements-eval.txt (nltk, sacrebleu) before running this;
# $PYTHON (default python3) is the interpreter they are installed for (tools/setup-dev.sh sets it).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

need=()
[ -f /usr/share/wordnet/data.noun ] || need+=(wordnet-base)
[ -f /usr/share/wordnet/index.sense ] || need+=(wordnet-sense-index)
if [ ${#need[@]} -gt 0 ]; then
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
fi

"${PYTHON:-python3}" evaluation/wordnet_setup.py
