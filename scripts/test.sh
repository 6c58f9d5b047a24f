#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: lint, types, tests on asyncio and trio.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
