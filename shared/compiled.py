"""Which modules run compiled: the optional mypyc build of the hot pure modules.

The pure-Python package is the default. ``bash scripts/compiled.sh build`` compiles the
modules of :data:`MODULES` with mypyc, in place: an extension module beside each ``.py``,
which the import system prefers (docs/compiled.md). ``workerbus info`` says which ones are
in use; ``workerbus bench`` writes the same into its report. (``import shared`` refuses a
build whose sources changed since: ``shared._check_compiled_build``.)
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys

__all__ = ["MODULES", "is_compiled", "status", "summary"]

#: The modules the compiled build compiles (scripts/build_compiled.py builds these and
#: only these). Each must compile, pass its tests compiled, and pay (docs/benchmarks.md).
MODULES = (
    "shared.frame",
    "shared.messages",
    "shared.dispatch",
    "shared.sequence",
)


def is_compiled(name: str) -> bool:
    """True if module ``name`` is imported (importing it if need be) from an extension."""
    module = sys.modules.get(name) or importlib.import_module(name)
    return (getattr(module, "__file__", None) or "").endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def status() -> dict[str, bool]:
    """Each module of :data:`MODULES` and whether it runs compiled."""
    return {name: is_compiled(name) for name in MODULES}


def summary() -> str:
    """One line: ``yes (N modules: mypyc)``, ``no`` or ``partly (the compiled ones)``."""
    state = status()
    done = [name for name, compiled in state.items() if compiled]
    if not done:
        return "no"
    if len(done) == len(state):
        return f"yes ({len(done)} modules: mypyc)"
    return f"partly ({', '.join(done)})"
