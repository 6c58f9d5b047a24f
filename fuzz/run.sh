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
harnesses=(${HARNESSES:-frame handshake codec publish})
total=${#harnesses[@]}
# On a terminal, a line redrawn in place while a harness runs: inputs done and time left.
# Piped or redirected: only the plain lines below (no carriage returns, no escape codes).
if [ -t 2 ] && [ "${TERM:-dumb}" != dumb ]; then live=1; else live=0; fi

left() {  # seconds -> "~40 s left" / "~3 min left"
    if [ "$1" -lt 60 ]; then echo "~$1 s left"; else echo "~$(( ($1 + 30) / 60 )) min left"; fi
}

show_progress() {  # log file, start time, label, index
    local n elapsed estimate
    # libFuzzer's status lines start with #<inputs done>
    n=$(grep -aoE '^#[0-9]+' "$1" 2>/dev/null | tail -1 | tr -d '#') || true
    n=${n:-0}
    elapsed=$(( $(date +%s) - $2 ))
    if [ "$n" -gt 0 ] && [ "$elapsed" -gt 0 ]; then
        estimate=$(left $(( elapsed * (RUNS - n) / n )))
    else
        estimate="estimating time left"
    fi
    printf '\r\033[K[%d/%d] %s %d/%d inputs … %s' "$4" "$total" "$3" "$n" "$RUNS" "$estimate" >&2
}

k=0
for harness in "${harnesses[@]}"; do
    k=$((k + 1))
    mkdir -p "$ROOT/$harness"
    echo "== [$k/$total] fuzz_$harness: $RUNS inputs (corpus $ROOT/$harness)"
    start=$(date +%s)
    cmd=("$PY" "fuzz/fuzz_$harness.py" -atheris_runs="$RUNS" -timeout=5 -rss_limit_mb=1024 "$ROOT/$harness")
    ok=1
    if [ $live = 1 ]; then
        # In the background so that this loop can redraw; a background job of a script
        # ignores Ctrl-C, so pass it on.
        "${cmd[@]}" 2>"$ROOT/$harness.log" &
        pid=$!
        trap 'kill "$pid" 2>/dev/null; printf "\r\033[K" >&2; exit 130' INT TERM
        while kill -0 "$pid" 2>/dev/null; do
            show_progress "$ROOT/$harness.log" "$start" "fuzz_$harness" "$k"
            sleep 1
        done
        printf '\r\033[K' >&2
        wait "$pid" || ok=0
        trap - INT TERM
    else
        "${cmd[@]}" 2>"$ROOT/$harness.log" || ok=0
    fi
    if [ $ok = 0 ]; then
        status=1
        echo "   FAILED: see $ROOT/$harness.log"
    fi
    grep -E "^Done" "$ROOT/$harness.log" | sed 's/^/   /' || true
    # the last progress line: edges covered (cov), corpus size, executions/s, peak rss
    grep -E "cov: " "$ROOT/$harness.log" | tail -1 | sed 's/^/   last: /' || true
    echo "   wall: $(( $(date +%s) - start )) s"
done
exit $status
