#!/usr/bin/env bash
# Everything the CPU test suite needs on a fresh Debian machine; README's test line runs it before
# pytest, and so does CI. The Python packages of requirements-dev.txt (for the `python` that runs
# pytest), then Debian's WordNet for METEOR through .ci/install-eval.sh (apt-get; sudo unless root).
# Rerunning it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=$(command -v python || command -v python3)
echo "== pip install -r requirements-dev.txt (minutes on a fresh machine)"
"$PYTHON" -m pip install -q -r requirements-dev.txt
echo "== WordNet for METEOR"
PYTHON="$PYTHON" bash .ci/install-eval.sh
