#!/usr/bin/env bash
# The optional compiled build (mypyc) of workerbus's hot pure modules, in place: an
# extension module beside each .py, which Python then imports instead (docs/compiled.md).
# The pure-Python package is the default; this is opt-in and undone by `remove`.
#
#   bash scripts/compiled.sh build    # set-up if need be, then compile (~30 s)
#   bash scripts/compiled.sh remove   # back to pure Python (every Python version's build)
#   bash scripts/compiled.sh status   # which modules run compiled
#
# PYTHON and VENV as for scripts/setup.sh: a build belongs to one Python version, and
# builds for several versions live side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
case "${1:-}" in
    build)
        [ -x "$VENV/bin/mypyc" ] || bash scripts/setup.sh
        # The build's own need: setuptools >= 77, which reads pyproject's SPDX `license`
        # (a venv starts with the older one ensurepip brings).
        "$VENV/bin/python" -m pip install -q "setuptools>=77"
        "$VENV/bin/python" scripts/build_compiled.py build
        "$VENV/bin/workerbus" info
        ;;
    remove)
        if [ -x "$VENV/bin/python" ]; then python=$VENV/bin/python; else python=python3; fi
        "$python" scripts/build_compiled.py remove
        ;;
    status)
        "$VENV/bin/workerbus" info
        ;;
    *)
        echo "usage: bash scripts/compiled.sh build|remove|status" >&2
        exit 2
        ;;
esac
