#!/usr/bin/env bash
# Run every atheris harness for RUNS inputs each (default one million).
#   bash fuzz/run.sh            # 1_000_000 inputs per harness
#   RUNS=20000 bash fuzz/run.sh # a quick smoke run
#   HARNESSES=codec bash fuzz/run.sh  # one harness
# Each harness starts from an empty corpus in a temp dir (kept in $CORPUS_ROOT if set).
# A failure leaves a crash-* / timeout-* / oom-* file in the current directory and
# makes the script exit non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-1000000}
PY=${PY:-.venv/bin/python}
ROOT=${CORPUS_ROOT:-$(mktemp -d)}
status=0
for harness in ${HARNESSES:-frame handshake codec publish}; do
    mkdir -p "$ROOT/$harness"
    echo "== fuzz_$harness: $RUNS inputs (corpus $ROOT/$harness)"
    start=$(date +%s)
    if ! "$PY" "fuzz/fuzz_$harness.py" -atheris_runs="$RUNS" -timeout=5 -rss_limit_mb=1024 \
        "$ROOT/$harness" 2>"$ROOT/$harness.log"; then
        status=1
        echo "   FAILED: see $ROOT/$harness.log"
    fi
    grep -E "^Done" "$ROOT/$harness.log" | sed 's/^/   /'
    # the last progress line: edges covered (cov), corpus size, executions/s, peak rss
    grep -E "cov: " "$ROOT/$harness.log" | tail -1 | sed 's/^/   last: /'
    echo "   wall: $(( $(date +%s) - start )) s"
done
exit $status
