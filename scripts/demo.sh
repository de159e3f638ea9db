#!/usr/bin/env bash
# Sets up this checkout (scripts/setup.sh) and runs the demo: RL and the shipped RLN on a
# synthetic widefield volume; writes rln_fast_demo/demo.png and demo.json.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
"${PYTHON:-python3}" -m rln_fast.cli demo "$@"
