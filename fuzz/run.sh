#!/usr/bin/env bash
# Run every atheris harness for RUNS inputs each (default one million).
#   bash fuzz/run.sh            # 1_000_000 inputs per harness
#   RUNS=20000 bash fuzz/run.sh # a quick smoke run
# Each harness starts from an empty corpus in a temp dir (kept in $CORPUS_ROOT if set).
# A failure leaves a crash-* / timeout-* / oom-* file in the current directory and
# makes the script exit non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-1000000}
PY=${PY:-.venv/bin/python}
ROOT=${CORPUS_ROOT:-$(mktemp -d)}
status=0
for harness in frame handshake codec; do
    mkdir -p "$ROOT/$harness"
    echo "== fuzz_$harness: $RUNS inputs (corpus $ROOT/$harness)"
    start=$(date +%s)
    if ! "$PY" "fuzz/fuzz_$harness.py" -atheris_runs="$RUNS" -timeout=5 -rss_limit_mb=1024 \
        -print_final_stats=1 "$ROOT/$harness" 2>"$ROOT/$harness.log"; then
        status=1
        echo "   FAILED: see $ROOT/$harness.log"
    fi
    grep -E "^(Done|stat::number_of_executed_units|stat::peak_rss_mb)" "$ROOT/$harness.log" | sed 's/^/   /'
    grep -E "cov: " "$ROOT/$harness.log" | tail -1 | sed 's/^/   last: /'
    echo "   wall: $(( $(date +%s) - start )) s"
done
exit $status
