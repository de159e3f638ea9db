#!/usr/bin/env bash
# Sets up this checkout (pinned CPU torch if none, the package built in place) and runs the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==${RLN_FAST_TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install -q setuptools wheel ninja numpy
"$PY" -m pip install -q --no-build-isolation -e .
"$PY" -m rln_fast.cli demo "$@"
