#!/usr/bin/env bash
# Installs this checkout into the current Python, doing only what is not done yet: the pinned
# CPU torch wheel when no torch is there; the extension build (`pip install --no-build-isolation
# -e ".$1"`, against that torch) when csrc/, setup.py, pyproject.toml, a RLN_FAST_* switch,
# torch or Python changed since the last build, or the installed package is not this checkout
# (scripts/setup_check.py decides, from build/setup-stamp.json); else only the missing
# dependencies of the extras named in $1 (e.g. "[dev]"); else nothing (a second or two).
#   bash scripts/setup.sh [--check] ["[dev]"]   --check: say what would be done, change nothing
#                                               (exit 0 nothing, 1 build, 2 dependencies)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CHECK=0
if [ "${1:-}" = "--check" ]; then CHECK=1; shift; fi
EXTRAS=${1:-}

if [ "$CHECK" = 1 ]; then
  exec "$PY" scripts/setup_check.py plan "$EXTRAS"
fi

if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)" 2>/dev/null; then
  echo "rln_fast setup: installing torch ${RLN_FAST_TORCH_VERSION:-2.13.0} (no torch in $PY)"
  "$PY" -m pip install -q "torch==${RLN_FAST_TORCH_VERSION:-2.13.0}"
fi

code=0
plan=$("$PY" scripts/setup_check.py plan "$EXTRAS") || code=$?
case "$code" in
  0)
    echo "rln_fast setup: $plan; nothing to do"
    ;;
  2)
    mapfile -t missing <<< "$plan"
    echo "rln_fast setup: installing missing dependencies: ${missing[*]}"
    "$PY" -m pip install -q "${missing[@]}"
    ;;
  1)
    cores=$(nproc 2>/dev/null || echo 2)
    jobs=${MAX_JOBS:-$cores}
    # A CPU-only build is ~9 core-minutes of compiling (4.5 min on 2 cores); CUDA adds more.
    minutes=$(( (9 + jobs - 1) / jobs + 1 ))
    echo "rln_fast setup: building and installing rln_fast ($(echo "$plan" | paste -sd ';' -));"
    echo "rln_fast setup: compiling the C++ kernels with $jobs parallel jobs takes about" \
         "$minutes min here (4.5 min on 2 cores; longer with the CUDA kernels), quietly until done"
    start=$(date +%s)
    "$PY" -m pip install -q setuptools wheel ninja numpy
    "$PY" -m pip install -q --no-build-isolation -e ".${EXTRAS}"
    "$PY" scripts/setup_check.py done
    echo "rln_fast setup: built and installed in $(( $(date +%s) - start )) s"
    ;;
  *)
    echo "rln_fast setup: scripts/setup_check.py failed (exit $code): $plan" >&2
    exit "$code"
    ;;
esac
