#!/usr/bin/env bash
# Set up (idempotent) and run the multi-worker demo: a broker and N worker processes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
exec .venv/bin/workerbus demo "$@"
