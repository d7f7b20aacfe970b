#!/usr/bin/env bash
# The k sweep of docs/results/k-sweep-cpu: binary, TopK and hybrid skip transcoders on layers.9.mlp of
# the default model, k in {16, 32, 64, 128}, each at four learning rates (10, 30, 100 and 300 times the
# batch-scaled LR law), all 48 trained from ONE activation cache (no LM during training), the best LR
# per (variant, k) kept on held-out FVU, then the comparison report of the 12 chosen coders.
# Work in runs/k-sweep-cpu; the report, the LR table, the metrics and each part's wall time are copied to
# docs/results/k-sweep-cpu/. Estimated at about a quarter of an hour on an idle 2-core CPU (from the
# measured costs of the LM forward and a coder step; not a timing). Extra arguments go to `binsparse train`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -z "${BINSPARSE:-}" ]; then  # BINSPARSE="python -m binsparse_kernels" runs it in another environment
    bash scripts/setup_env.sh
    BINSPARSE=.venv/bin/binsparse
fi
OUT=runs/k-sweep-cpu
DOCS=docs/results/k-sweep-cpu
mkdir -p "$OUT" "$DOCS"
TIMES="$OUT/timings.txt"
{
    echo "commit $(git rev-parse --short HEAD), $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), load before: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$TIMES"
part() {  # part NAME COMMAND...: run it, append its wall time to timings.txt
    local name=$1 start=$SECONDS
    shift
    "$@"
    echo "$name: $((SECONDS - start)) s (load after: $(cut -d' ' -f1 /proc/loadavg))" | tee -a "$TIMES"
}
part "cache: one LM pass over the corpus (151,296 training + 8,192 held-out tokens)" \
    $BINSPARSE cache --hookpoints layers.9.mlp --max_tokens 600000 --out "$OUT/cache"
part "train: 48 coders (3 variants x 4 k x 4 LRs), 245,760 tokens each, from the cache" \
    $BINSPARSE train --activations "$OUT/cache" --k 16 32 64 128 --lr_sweep 10,30,100,300 \
    --max_tokens 245760 --save_dir "$OUT" --run_name run --no_report "$@"
part "report: the 12 chosen coders spliced into the model on 4,096 held-out tokens" \
    $BINSPARSE report "$OUT/run" --out "$OUT/run/report" --tokens 4096
cp "$OUT"/run/report/{report.md,results.json,*.png} "$OUT"/run/{lr_sweep.json,metrics.jsonl} "$TIMES" "$DOCS"/
echo "copied the report, lr_sweep.json, metrics.jsonl and timings.txt to $DOCS"
