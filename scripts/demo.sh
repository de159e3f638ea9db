#!/usr/bin/env bash
# Sets up this checkout (scripts/setup.sh) and runs the demo: RL and the shipped RLN on a
# synthetic widefield volume; writes rln_fast_demo/demo.png and demo.json.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The rln-fast command the install put beside this Python (or on PATH).
PY=${PYTHON:-python3}
BIN="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/rln-fast"
if [ -x "$BIN" ]; then "$BIN" demo "$@"; else "$PY" -m rln_fast.cli demo "$@"; fi
