#!/usr/bin/env bash
# Sets up ./.venv (torch, dependencies, the compiled extension) and runs the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k decode -x`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec .venv/bin/python -m pytest -q "$@"
