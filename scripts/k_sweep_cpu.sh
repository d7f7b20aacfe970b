#!/usr/bin/env bash
# The k sweep of docs/results/k-sweep-cpu: binary, TopK and hybrid skip transcoders on layers.9.mlp of
# the default model, k in {16, 32, 64, 128}, each at three learning rates, all trained from ONE activation
# cache (no LM during training), the best LR per (variant, k) kept, then the comparison report.
# Writes runs/k-sweep-cpu/{cache,run,timings.txt}; sized for about ten minutes on an idle 2-core CPU.
# Extra arguments go to `binsparse train`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
OUT=runs/k-sweep-cpu
mkdir -p "$OUT"
: > "$OUT/timings.txt"
part() {  # part NAME COMMAND...: run it, append its wall time to timings.txt
    local name=$1 start=$SECONDS
    shift
    "$@"
    echo "$name: $((SECONDS - start)) s" | tee -a "$OUT/timings.txt"
}
echo "machine: $(nproc) cores, load before: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/timings.txt"
part "cache (one LM pass: the corpus's 151k training tokens + 8k held-out)" \
    .venv/bin/binsparse cache --hookpoints layers.9.mlp --max_tokens 600000 --out "$OUT/cache"
part "train (36 coders: 3 variants x 4 k x 3 LRs, 245,760 tokens each, from the cache)" \
    .venv/bin/binsparse train --activations "$OUT/cache" --k 16 32 64 128 --lr_sweep 3,10,30 \
    --max_tokens 245760 --save_dir "$OUT" --run_name run --no_report "$@"
part "report (the 12 chosen coders spliced into the model on 4,096 held-out tokens)" \
    .venv/bin/binsparse report "$OUT/run" --out "$OUT/run/report" --tokens 4096
echo "machine load after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/timings.txt"
