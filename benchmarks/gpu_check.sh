#!/usr/bin/env bash
# The GPU check, one call on a CUDA machine: build for sm_90 with ninja on all cores, CUDA tests,
# compute-sanitizer memcheck on a small case, the GPU benchmark; JSON and logs to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} RLN_FAST_FORCE_CUDA=1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0
step() { echo "== $1 ($(date +%T))"; }

step "build"
if ! "$PY" -m pip install --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; exit 1
fi
"$PY" -c "import json, rln_fast; print(json.dumps(rln_fast.backend_info()))" | tee "$OUT/backend.json"

# The official checkpoint travels in _local/ (git-ignored); tests look for ../shared.
if [ -d _local/shared ] && [ ! -e ../shared ]; then ln -s "$PWD/_local/shared" ../shared; fi

step "CUDA tests"
"$PY" -m pytest -q -p no:cacheprovider ${GPU_TESTS:-tests} 2>&1 | tee "$OUT/pytest_cuda.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "compute-sanitizer memcheck"
compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" benchmarks/sanitize_case.py > "$OUT/sanitizer.log" 2>&1
rc=$?; tail -3 "$OUT/sanitizer.log"; [ $rc -eq 0 ] || status=1

step "benchmarks: ops, RLN inference, RL"
"$PY" benchmarks/gpu_report.py --out "$OUT/gpu_report.json" --skip compile ${GPU_REPORT_ARGS:-} || status=1

step "benchmark: training step"
"$PY" -m pytest -q -p no:cacheprovider benchmarks/bench_train.py -k cuda \
  --benchmark-json "$OUT/bench_train_cuda.json" 2>&1 | tail -4

step "benchmark: torch.compile baseline of the plain RLN"
fused_ms=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['rln_inference']['fused_ms'])" "$OUT/gpu_report.json" 2>/dev/null)
[ -n "$fused_ms" ] && "$PY" benchmarks/gpu_report.py --out "$OUT/gpu_compile.json" --skip layers rln rl \
  --fused-ms "$fused_ms" || status=1
step "done (status $status)"
exit $status
