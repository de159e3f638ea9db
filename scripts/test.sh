#!/usr/bin/env bash
# Sets up this checkout (pinned CPU torch if none, the package built in place) and runs the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==${RLN_FAST_TORCH_VERSION:-2.13.0}"
fi
# Build requirements first: the build runs without isolation, against the torch above.
"$PY" -m pip install -q setuptools wheel ninja numpy
"$PY" -m pip install -q --no-build-isolation -e ".[dev]"
"$PY" -m pytest -q "$@"
