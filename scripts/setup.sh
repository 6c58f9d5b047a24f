#!/usr/bin/env bash
# Set up everything workerbus needs on a fresh Debian machine, idempotently:
# Debian packages (luajit for the Kong-codec oracle tests, redis-server and wrk for the
# benchmarks and the cluster bridge tests, nats-server for the bridge, chromium and its
# webdriver for the browser tests, nginx with its Lua and stream modules for the opt-in
# interop test against lua-resty-events, docs/kong.md §4), a virtualenv, and the project
# with all its extras.
#
#   PYTHON=python3.13 VENV=.venv-3.13 bash scripts/setup.sh
#
# PYTHON picks the interpreter (default python3; any Python >= 3.10), VENV the virtualenv
# directory (default .venv), so that several Python versions can live side by side.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v luajit >/dev/null || missing+=(luajit2)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v wrk >/dev/null || missing+=(wrk)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
command -v nats-server >/dev/null || missing+=(nats-server)
# nginx lives in /usr/sbin, which is not on every user's PATH
[ -x /usr/sbin/nginx ] || missing+=(nginx)
for module in http-lua stream; do
    [ -e "/usr/lib/nginx/modules/ngx_${module/-/_}_module.so" ] || missing+=("libnginx-mod-$module")
done
[ -e /usr/share/lua/5.1/resty/core.lua ] || missing+=(lua-resty-core lua-resty-lrucache lua-cjson)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    echo "setup: installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "setup: workerbus needs Python >= 3.10; $PYTHON is $("$PYTHON" -V 2>&1)" >&2
    exit 1
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
# (setuptools >= 80 prints an informational "Editable installation" warning on every editable
# install; it says nothing about this project, so it is filtered, and only it)
PYTHONWARNINGS="ignore:Editable installation" \
    "$VENV/bin/python" -m pip install -q -e ".[dev,servers,bench,top,plot,channels,nats,redis]"
echo "setup: ready ($VENV, $("$VENV/bin/python" -V))"
