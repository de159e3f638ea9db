#!/usr/bin/env bash
# The GPU check, one call on a CUDA machine; results (JSON, logs) to $OUT:
#   build for sm_90 with ninja on 16 jobs -> CUDA tests -> compute-sanitizer memcheck of every
#   kernel on a small case -> the report (benchmarks/gpu_report.py, compile baseline last).
# Measured on one H200 (2026-12-04): build 66 s, CUDA tests 34 s, memcheck 14 s, report 132 s
# (of which torch.compile 25 s): 252 s in all, plus about 30 s for the machine's start.
#
#   benchmarks/gpu_check.sh            the GPU run (needs nvcc, a CUDA torch and a GPU)
#   benchmarks/gpu_check.sh --smoke    the same script on the CPU, tiny sizes, no build and no
#                                      sanitizer: what CI runs so the script cannot rot
#   benchmarks/gpu_check.sh [--smoke] --train PLAN
#                                      instead of the tests and report: build, then train the
#                                      stages of PLAN (scripts/train_chain.py) on the GPU, in
#                                      /tmp/rln_chain, stopping at a checkpoint after
#                                      TRAIN_DEADLINE_S seconds (default 420); every model and
#                                      log comes back packed in $OUT/chain.tar.gz, re-packed
#                                      after each stage. --smoke: 2 steps of each stage on the CPU
# Every step's exit status counts: the script exits non-zero when any step failed, after
# running the rest (a failed build stops it). GPU_TESTS / GPU_REPORT_ARGS override the tests
# and add report arguments.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
PLAN=
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; shift; fi
if [ "${1:-}" = "--train" ] && [ $# -eq 2 ]; then PLAN=$2; shift 2; fi
if [ $# -gt 0 ]; then echo "usage: $0 [--smoke] [--train PLAN]" >&2; exit 2; fi
if [ -n "$PLAN" ] && [ ! -f "$PLAN" ]; then echo "$0: no plan file $PLAN" >&2; exit 2; fi
OUT=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0
failed=()
step() { echo "== $1 ($(date +%T))"; }
fail() { status=1; failed+=("$1"); echo "!! $1 failed"; }

# The official checkpoint and data travel in _local/shared (git-ignored); tests and the report
# look for ../shared beside the checkout.
if [ -d _local/shared ] && [ ! -e ../shared ]; then ln -s "$PWD/_local/shared" ../shared; fi

# Training: the chain's stages, packed into $OUT after each one (exit 3: stopped at the deadline).
train_chain() {
  step "train: $PLAN"
  "$PY" scripts/train_chain.py "$PLAN" "${CHAIN_DIR:-/tmp/rln_chain}" --pack "$OUT/chain.tar.gz" "$@" \
    2>&1 | tee "$OUT/train.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || [ "$rc" -eq 3 ] || fail "training"
  [ "$rc" -ne 3 ] || echo "stopped at the deadline: re-run to go on"
}

if [ $SMOKE -eq 1 ] && [ -n "$PLAN" ]; then
  train_chain --smoke --device cpu
  step "done (status $status${failed:+; failed: ${failed[*]}})"
  exit $status
fi

if [ $SMOKE -eq 1 ]; then
  step "smoke: extension"
  "$PY" -c "import json, rln_fast; print(json.dumps(rln_fast.backend_info()))" > "$OUT/backend.json" \
    || fail "import"
  step "smoke: device-generic tests (CPU twin)"
  "$PY" -m pytest -q -x -p no:cacheprovider ${GPU_TESTS:-tests/test_cuda_paths.py} > "$OUT/pytest.log" 2>&1 \
    || fail "tests"
  tail -2 "$OUT/pytest.log"
  step "smoke: report"
  report_args=(--random-weights)
  [ -f ../shared/official_rln/model.ckpt.index ] && report_args=()
  "$PY" benchmarks/gpu_report.py --smoke --out "$OUT" "${report_args[@]}" ${GPU_REPORT_ARGS:-} \
    > "$OUT/report.log" 2>&1 || fail "report"
  tail -3 "$OUT/report.log"
  step "done (status $status${failed:+; failed: ${failed[*]}})"
  exit $status
fi

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} RLN_FAST_FORCE_CUDA=1
step "build (sm_${TORCH_CUDA_ARCH_LIST/./}, $MAX_JOBS jobs)"
if ! "$PY" -m pip install --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "!! build failed"; exit 1
fi
"$PY" -c "import json, rln_fast; i = rln_fast.backend_info(); print(json.dumps(i)); assert i['cuda'], 'no CUDA kernels'" \
  | tee "$OUT/backend.json"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "!! the build has no CUDA kernels"; exit 1; }

if [ -n "$PLAN" ]; then
  train_chain --device cuda --checkpoint-every 250 --deadline-s "${TRAIN_DEADLINE_S:-420}"
  step "done (status $status${failed:+; failed: ${failed[*]}})"
  exit $status
fi

step "CUDA tests"
"$PY" -m pytest -q -p no:cacheprovider -k "cuda or gpu" \
  ${GPU_TESTS:-tests/test_cuda_paths.py tests/test_ops.py tests/test_ops_fused.py tests/test_rl_ops.py tests/test_rln.py tests/test_nn.py tests/test_rl.py} \
  > "$OUT/pytest_cuda.log" 2>&1 || fail "CUDA tests"
tail -15 "$OUT/pytest_cuda.log"

step "compute-sanitizer memcheck (every kernel, small case)"
compute-sanitizer --tool memcheck --error-exitcode 3 --print-limit 20 "$PY" benchmarks/sanitize_case.py \
  > "$OUT/sanitizer.log" 2>&1 || fail "memcheck"
tail -4 "$OUT/sanitizer.log"

step "report: layers, RLN, rln_deconvolve, RL, training step, profile, torch.compile"
"$PY" benchmarks/gpu_report.py --out "$OUT" ${GPU_REPORT_ARGS:-} 2>&1 | tee "$OUT/report.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "report"

step "done (status $status${failed:+; failed: ${failed[*]}})"
exit $status
