#!/usr/bin/env bash
# First contact with a GPU machine, in one command of at most 8 minutes (GPU_CHECK_TOTAL_S), e.g. the
# device tool's H100/H200 (Python 3.12, torch, triton, nvcc, compute-sanitizer; no internet):
#
#   OUT=/where/results/go bash scripts/gpu_check.sh          (OUT defaults to ./gpu_out)
#
# Steps, in order; each is time-boxed with `timeout` (so one hang costs only its own box) and writes
# its results under $OUT as it finishes, so a run cut short still returns everything before the cut:
#   0 install    the wheels carried in .whl/ (scripts/fetch_gpu_wheels.sh) into a --target folder
#                put on PYTHONPATH
#   1 build      the CPU and CUDA extensions in place (MAX_JOBS=16, BINSPARSE_BUILD_CUDA=1)
#     doctor     `binsparse doctor`: versions, GPU, backends, _C_cuda's archs, every op of every
#                backend against the float64 reference                              -> doctor.txt
#   2 tests      the GPU tests (bf16 ones and tests/test_bench.py's GPU case included), no -x
#                                                                                   -> tests.log
#   3 sanitizer  compute-sanitizer memcheck over one small case of every op of the CUDA and Triton
#                backends (the first-use check's problem, every dtype)
#   4 bench      `binsparse bench --preset quick` without the torch.compile baseline -> cuda-quick-*.json/csv
#     bench-compile  the same cases, the torch.compile baseline alone (if time is left) -> cuda-quick-compile-*
#   5 summary    one screen: each step's status and time and what it found             -> summary.txt
# Logs of install, build, sanitizer and bench go to steps.log. At most 8 files land in $OUT (the
# device tool returns no more). Exit status 0 only if every step passed.
#
# Rehearsal: GPU_CHECK_REHEARSAL=1, or automatically when torch sees no GPU. Every step runs its own
# command line with the GPU parts replaced: the build and compute-sanitizer are skipped (saying what
# would run), the GPU tests skip themselves, the sanitizer's target checks the cpu backend instead of
# cuda/triton, and the bench times one tiny CPU case. tests/test_gpu_check_script.py runs it in CI.
#
# Knobs: PYTHON (default python3), GPU_CHECK_TOTAL_S (470), GPU_CHECK_<STEP>_S (each step's box, e.g.
# GPU_CHECK_TESTS_S), GPU_CHECK_STEPS (a subset, e.g. "build doctor bench"), GPU_CHECK_WHEELS (.whl),
# GPU_CHECK_PYTEST_WORKERS (4, when pytest-xdist is there).
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
SITE="$WORK/site"
WHEELS="${GPU_CHECK_WHEELS:-$ROOT/.whl}"
TOTAL_S="${GPU_CHECK_TOTAL_S:-470}"
SUMMARY_RESERVE_S=10
DEADLINE=$((SECONDS + TOTAL_S - SUMMARY_RESERVE_S))
ALL_STEPS="install build doctor tests sanitizer bench bench-compile"
STEPS="${GPU_CHECK_STEPS:-$ALL_STEPS}"
STAMP="$(date -u +%Y%m%dt%H%M%Sz)"
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PY SITE WHEELS

if [ -z "${GPU_CHECK_REHEARSAL:-}" ]; then
    if timeout 120 "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        GPU_CHECK_REHEARSAL=0
    else
        GPU_CHECK_REHEARSAL=1
    fi
fi
REHEARSAL="$GPU_CHECK_REHEARSAL"
if [ "$REHEARSAL" = 1 ]; then
    unset TRITON_INTERPRET  # a machine without a GPU, as CI sees it: no Triton on the CPU
    echo "REHEARSAL (no GPU, or GPU_CHECK_REHEARSAL=1): the GPU parts are replaced by their own skips"
fi

# --- bookkeeping: one status line per step, the summary rewritten after each --------------------

STATUS="$WORK/status"
: > "$STATUS"
FAILED=0

record() {  # record STEP STATUS SECONDS NOTE
    printf '%-14s %-22s %5ss  %s\n' "$1" "$2" "$3" "$4" >> "$STATUS"
    case "$2" in ok|skipped*) ;; *) FAILED=1 ;; esac
    write_summary
}

box_for() {  # a step's time box: its own (GPU_CHECK_<STEP>_S, else the default) within the deadline; 0 if
            # less than 5 s are left
    local var="GPU_CHECK_$(echo "$1" | tr 'a-z-' 'A-Z_')_S"
    local own="${!var:-$2}" left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 5 ]; then echo 0; else echo $((own < left ? own : left)); fi
}

wanted() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# run_step STEP DEFAULT_BOX LOG COMMAND...: time-boxed, output appended to $OUT/LOG
run_step() {
    local step="$1" default_box="$2" log="$OUT/$3"; shift 3
    if ! wanted "$step"; then
        record "$step" "skipped" 0 "not in GPU_CHECK_STEPS"
        return 0
    fi
    local box
    box="$(box_for "$step" "$default_box")"
    if [ "$box" -le 0 ]; then
        record "$step" "skipped: no time left" 0 "the total of ${TOTAL_S}s is spent"
        return 1
    fi
    local t0=$SECONDS rc
    echo "== $step ($(date -u +%H:%M:%S) UTC, time box ${box}s): $*" >> "$log"
    if declare -F "$1" > /dev/null; then  # a function of this script: timeout runs programs only
        set -- bash -c "$(declare -f "$1"); $1"
    fi
    timeout --kill-after=10 "$box" "$@" >> "$log" 2>&1
    rc=$?
    echo "== $step: exit status $rc after $((SECONDS - t0))s" >> "$log"
    case $rc in
        0) record "$step" ok $((SECONDS - t0)) "log: $(basename "$log")" ;;
        124|137) record "$step" "TIMEOUT" $((SECONDS - t0)) "killed at its ${box}s box; log: $(basename "$log")" ;;
        *) record "$step" "FAILED (exit $rc)" $((SECONDS - t0)) "log: $(basename "$log")" ;;
    esac
    return $rc
}

skip_in_rehearsal() {  # skip_in_rehearsal STEP WHAT-WOULD-RUN
    wanted "$1" || { record "$1" skipped 0 "not in GPU_CHECK_STEPS"; return 0; }
    echo "== $1: rehearsal, skipped; on a GPU machine it runs: $2" >> "$OUT/steps.log"
    record "$1" "skipped (rehearsal)" 0 "would run: $2"
}

write_summary() {
    {
        echo "gpu_check.sh $([ "$REHEARSAL" = 1 ] && echo REHEARSAL) at $STAMP, $SECONDS s so far of ${TOTAL_S}s"
        cat "$STATUS"
        if [ -s "$OUT/doctor.txt" ]; then
            echo "-- doctor"
            grep -E "^GPU |^torch |^triton |^driver |machine code|NO code|UNAVAILABLE" "$OUT/doctor.txt" | head -n 8
            grep -E " FAIL |checks passed" "$OUT/doctor.txt" | head -n 8
        fi
        if [ -s "$OUT/tests.log" ]; then
            echo "-- tests"
            grep -oE "(FAILED|ERROR) tests/[^ ]+" "$OUT/tests.log" | sort -u | head -n 10
            grep -E "(passed|failed|error|skipped|no tests ran).* in [0-9.]+s" "$OUT/tests.log" | tail -n 1
        fi
        if [ -s "$OUT/steps.log" ]; then
            grep -E "ERROR SUMMARY|checks passed" "$OUT/steps.log" | sed 's/^/-- sanitizer: /' | head -n 6
        fi
        for json in "$OUT"/*.json; do
            [ -e "$json" ] || continue
            "$PY" - "$json" <<'EOF' 2>/dev/null || echo "-- bench: $(basename "$json") (unreadable)"
import json, sys
data = json.load(open(sys.argv[1]))
rows = data["rows"]
bad = [f"{r['case']}:{r['impl']}" for r in rows if r.get("status") != "ok"]
print(f"-- bench: {sys.argv[1].rsplit('/', 1)[-1]}: {len(rows)} rows, {len(bad)} not ok {' '.join(bad[:6])}")
EOF
        done
    } > "$OUT/summary.txt"
}

# --- the steps -----------------------------------------------------------------------------------

# 0 install: wheels built for Python 3.12 by scripts/fetch_gpu_wheels.sh, carried with the tree
install_wheels() {
    shopt -s nullglob
    local wheels=("$WHEELS"/*.whl)
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "no wheels in $WHEELS: nothing to install"
        return 0
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "${wheels[@]}" || return
    echo "installed into $SITE (on PYTHONPATH):"
    ls "$SITE" | grep -i "dist-info$"
}
run_step install 40 steps.log install_wheels

# 1 build, then the doctor
if [ "$REHEARSAL" = 1 ]; then
    skip_in_rehearsal build "MAX_JOBS=16 BINSPARSE_BUILD_CUDA=1 $PY setup.py build_ext --inplace"
else
    export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")}"
    export PATH="$CUDA_HOME/bin:$PATH"
    run_step build 180 steps.log env MAX_JOBS="${MAX_JOBS:-16}" BINSPARSE_BUILD_CUDA=1 \
        "$PY" setup.py build_ext --inplace
fi
DOCTOR_ARGS=()
[ "$REHEARSAL" = 1 ] && DOCTOR_ARGS=(--quick)
run_step doctor 75 doctor.txt "$PY" -m binsparse_kernels doctor "${DOCTOR_ARGS[@]}"

# 2 the GPU tests. The first-use self-check is off here: the doctor above reports it, and a test of a
# named backend must show its own failure rather than the check's (tests/test_self_check.py turns it on).
GPU_TESTS=(tests/test_cuda_backend.py tests/test_triton_encode.py tests/test_triton_sparse.py tests/test_ops.py
           tests/test_api.py tests/test_cuda_build.py tests/test_self_check.py tests/test_doctor.py
           tests/test_bench.py::test_gpu_suite_bf16)
PYTEST_ARGS=(-p no:cacheprovider -rfEs)
if [ "$REHEARSAL" = 1 ]; then
    PYTEST_ARGS+=(-q -m gpu)  # on a CPU the GPU tests skip themselves; the rest would only cost time
else
    PYTEST_ARGS+=(-v)  # a line per test as it ends: a run cut at its time box still says what failed
    "$PY" -c "import xdist" 2>/dev/null && PYTEST_ARGS+=(-n "${GPU_CHECK_PYTEST_WORKERS:-4}")
    "$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_ARGS+=(--timeout 120)
fi
run_step tests 200 tests.log env BINSPARSE_SELF_CHECK=0 "$PY" -m pytest "${PYTEST_ARGS[@]}" "${GPU_TESTS[@]}"

# 3 compute-sanitizer memcheck: every op of the CUDA and Triton backends on the first-use problem,
# with torch's caching allocator off so an access past a tensor's end lands outside any allocation
if [ "$REHEARSAL" = 1 ]; then
    SANITIZER=()
    SANITIZED_BACKENDS=cpu  # stands in for the GPU backends
    echo "== sanitizer: rehearsal: compute-sanitizer skipped, the cpu backend stands in for cuda,triton" \
        >> "$OUT/steps.log"
else
    SANITIZER=(compute-sanitizer --tool memcheck --error-exitcode 9)
    SANITIZED_BACKENDS=cuda,triton
fi
run_step sanitizer 60 steps.log env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "${SANITIZER[@]}" "$PY" -m binsparse_kernels doctor --quick --backends "$SANITIZED_BACKENDS"
# --- racecheck (reserved for the CUDA backend's encode: shared-memory top-k merge) ---------------
# Add here, as its own time-boxed step writing to steps.log, e.g.:
#   run_step racecheck 60 steps.log compute-sanitizer --tool racecheck --error-exitcode 9 \
#       "$PY" -m binsparse_kernels doctor --quick --backends cuda
# and name `racecheck` in ALL_STEPS above.
# -------------------------------------------------------------------------------------------------

# 4 the benchmark suite's quick preset: the backends and baselines first (what _PREFERENCE is decided
# from), then the torch.compile baseline alone (it compiles every case: minutes), each its own JSON
if [ "$REHEARSAL" = 1 ]; then
    BENCH=(--preset cpu-quick --device cpu --ops decode --variants binary --N 64 --min-time 0 --min-repeats 2
           --max-repeats 2 --warmup 1 --no-memory)
    BENCH_IMPLS=eager
    COMPILE_IMPLS=sparsify  # stands in for compile (seconds of compiling per case)
    BENCH_NAME=rehearsal-cpu
else
    BENCH=(--preset quick --device cuda --min-time 0.25)
    BENCH_IMPLS=""
    wanted bench && BENCH_IMPLS="$(timeout 60 "$PY" -c "import torch; from binsparse_kernels.bench import harness
print(','.join(i for i in harness.default_impls(torch.device('cuda')) if i != 'compile'))" 2>>"$OUT/steps.log")"
    COMPILE_IMPLS=compile
    BENCH_NAME=cuda-quick
fi
IMPLS_ARG=()
[ -n "$BENCH_IMPLS" ] && IMPLS_ARG=(--impls "$BENCH_IMPLS")  # if listing them failed: bench's defaults
run_step bench 120 steps.log "$PY" -m binsparse_kernels bench "${BENCH[@]}" "${IMPLS_ARG[@]}" \
    --out-dir "$OUT" --name "$BENCH_NAME-$STAMP"
run_step bench-compile 600 steps.log "$PY" -m binsparse_kernels bench "${BENCH[@]}" --impls "$COMPILE_IMPLS" \
    --out-dir "$OUT" --name "$BENCH_NAME-compile-$STAMP"

# 5 summary
write_summary
echo
cat "$OUT/summary.txt"
n_files="$(find "$OUT" -type f | wc -l)"
if [ "$n_files" -gt 8 ]; then
    echo "WARNING: $n_files files under $OUT; the device tool returns 8 at most"
fi
rm -rf "$WORK"
exit "$FAILED"
