#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: lint, types, tests on asyncio and trio.
# PYTHON and VENV as for scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
"$VENV/bin/ruff" check .
"$VENV/bin/mypy"
"$VENV/bin/python" -m pytest "$@"
