#!/usr/bin/env bash
# Sets up this checkout (scripts/setup.sh, with the dev extras) and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "[dev]"
"${PYTHON:-python3}" -m pytest -q "$@"
