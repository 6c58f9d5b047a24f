#!/usr/bin/env bash
# Set up everything workerbus needs on a fresh Debian machine, idempotently:
# Debian packages (luajit for the Kong-codec oracle tests, redis-server and wrk for the
# benchmarks and the cluster bridge tests, nats-server for the bridge), a virtualenv in .venv, and the project with all its extras.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v luajit >/dev/null || missing+=(luajit2)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v wrk >/dev/null || missing+=(wrk)
command -v nats-server >/dev/null || missing+=(nats-server)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    echo "setup: installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[dev,servers,bench,nats,redis]"
echo "setup: ready (.venv)"
