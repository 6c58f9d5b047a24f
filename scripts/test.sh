#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: lint, types, tests on asyncio and trio.
# PYTHON and VENV as for scripts/setup.sh. The tests run in WORKERBUS_TEST_JOBS processes
# side by side (pytest-xdist; default 2, 0 runs them all in this process), each taking
# whole test files, so the tests of one file never overlap. Most of the suite waits on
# real servers and worker processes, so two processes finish in ~0.6x the time of one on
# 2 cores. Arguments go to pytest after these, e.g. `-n 0 -k name` or `-x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
"$VENV/bin/ruff" check .
"$VENV/bin/mypy"
"$VENV/bin/python" -m pytest -n "${WORKERBUS_TEST_JOBS:-2}" --dist loadfile "$@"
