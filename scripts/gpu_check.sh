#!/usr/bin/env bash
# One-shot GPU validation and measurement, for a machine with a CUDA GPU (e.g. the device tool's
# H100/H200, which has torch, triton, nvcc and transformers but no internet):
#
#   OUT=/path/for/results bash scripts/gpu_check.sh [quick|full]
#
# 1. builds the package in place (CPU + CUDA extensions),
# 2. runs every GPU test of the CUDA and Triton backends against the reference (values, gradients),
# 3. runs compute-sanitizer (memcheck) over a small run of every CUDA op,
# 4. times the backends and baselines (the benchmark suite's quick preset and the per-backend scripts).
# Logs and JSON results land in $OUT (default ./gpu_out); copy the JSON into benchmarks/results/ and
# write what they show into benchmarks/RESULTS.md. Each step's exit status is printed; the script
# carries on after a failing step so one run shows everything.
set -uo pipefail
MODE="${1:-quick}"
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
PY="${PYTHON:-python}"
step() {  # step NAME LOGFILE COMMAND...: run, keep the log, print the status and the log's tail
    local name="$1" log="$OUT/$2"; shift 2
    local t0=$SECONDS
    "$@" > "$log" 2>&1
    local rc=$?
    echo "== $name: rc=$rc ($((SECONDS - t0)) s), log $log"
    tail -n 8 "$log"
    return $rc
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
"$PY" -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
MAX_JOBS="${MAX_JOBS:-16}" step build build.log "$PY" -m pip install --no-build-isolation --no-deps -e . || exit 1
step backends backends.log "$PY" -c "import binsparse_kernels as bk; print(bk.available_backends())"

GPU_TESTS=(tests/test_cuda_backend.py tests/test_triton_encode.py tests/test_triton_sparse.py tests/test_ops.py tests/test_api.py)
step pytest-gpu pytest_gpu.log "$PY" -m pytest -q -p no:cacheprovider -x "${GPU_TESTS[@]}"

step sanitizer sanitizer.log compute-sanitizer --tool memcheck --error-exitcode 9 \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_backend.py \
    -k "encode_matches and 37 or decode_matches and d13 or encode_backward and True-True-True"

step bench-triton-encode bench_triton_encode.log "$PY" benchmarks/bench_triton_encode.py --check --json "$OUT/triton_encode.json"
step bench-triton-sparse bench_triton_sparse.log "$PY" benchmarks/bench_triton_sparse.py --json "$OUT/triton_sparse.json"
step bench-cuda bench_cuda.log "$PY" benchmarks/bench_cuda.py --json "$OUT/cuda.json"
PRESET=quick
[ "$MODE" = full ] && PRESET=paper
step bench-suite bench_suite.log "$PY" benchmarks/run_suite.py --preset "$PRESET" --device cuda --out-dir "$OUT"
echo "results in $OUT"
