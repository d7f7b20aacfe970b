#!/usr/bin/env bash
# Sets up ./.venv and runs the default training job: binary, TopK and hybrid skip transcoders on
# SmolLM2-135M layer 9's MLP, offline, each at five learning rates on the same batches (the best per
# variant on held-out FVU is kept), then the comparison report. Extra arguments go to
# `binsparse train` (e.g. --max_tokens 5000000 on a GPU).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec .venv/bin/binsparse train "$@"
