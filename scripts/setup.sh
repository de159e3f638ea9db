#!/usr/bin/env bash
# Installs this checkout into the current Python: the pinned CPU torch wheel when no torch is
# there, the build requirements (the build runs without isolation, against that torch), then
# the package built in place with the extras named in $1 (e.g. "[dev]").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==${RLN_FAST_TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install -q setuptools wheel ninja numpy
"$PY" -m pip install -q --no-build-isolation -e ".${1:-}"
