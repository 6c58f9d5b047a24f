"""Which modules run compiled: the optional mypyc build of the hot pure modules.

The pure-Python package is the default. ``bash scripts/compiled.sh build`` compiles the
modules of :data:`MODULES` with mypyc, in place: an extension module beside each ``.py``,
which the import system prefers (docs/compiled.md). ``workerbus info`` says which
ones are in use; ``workerbus bench`` writes the same into its report.

A compiled module built from an older ``.py`` would run the old code without a word: the
build records a hash of each source it compiled, and :func:`check_build` (run by ``import
shared``, before any of them can load) refuses a build that no longer matches its sources.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys

__all__ = ["MODULES", "StaleBuild", "check_build", "is_compiled", "manifest_path", "status", "summary"]

#: The modules the compiled build compiles (scripts/build_compiled.py builds these and
#: only these). Each must compile, pass its tests compiled, and pay (docs/benchmarks.md).
MODULES = (
    "shared.frame",
    "shared.messages",
    "shared.dispatch",
)

_HERE = os.path.dirname(os.path.abspath(__file__))
#: The file name ending of this interpreter's extension modules (".cpython-311-...so").
_SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


class StaleBuild(ImportError):
    """A compiled module no longer matches its ``.py`` (it was edited after the build)."""


def manifest_path(directory: str = _HERE) -> str:
    """Where the build records its sources' hashes, per interpreter ABI (builds for two
    Python versions live side by side)."""
    return os.path.join(directory, "compiled" + _SUFFIX.rsplit(".", 1)[0] + ".json")


def source_hash(path: str) -> str:
    import hashlib  # (here: ``import shared`` runs this module, and rarely needs it)

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def check_build(directory: str = _HERE, modules: tuple[str, ...] = MODULES) -> None:
    """Refuse a compiled build whose sources changed since it was built.

    Cheap when there is no build (one failed ``stat`` per module) or the build is newer
    than its sources; only a source newer than its extension module is hashed.

    Raises:
        StaleBuild: a module's extension exists but was built from other source bytes.
    """
    recorded: dict[str, str] | None = None
    for name in modules:
        short = name.rpartition(".")[2]
        source = os.path.join(directory, short + ".py")
        try:
            built = os.stat(os.path.join(directory, short + _SUFFIX)).st_mtime
        except OSError:
            continue  # not compiled
        try:
            if os.stat(source).st_mtime <= built:
                continue
        except OSError:
            continue  # no source to be stale against
        if recorded is None:
            import json

            try:
                with open(manifest_path(directory), encoding="utf-8") as f:
                    recorded = dict(json.load(f))
            except (OSError, ValueError, TypeError):
                recorded = {}
        if recorded.get(name) != source_hash(source):
            raise StaleBuild(
                f"workerbus: the compiled {name} was built from another version of "
                f"{source}; rebuild it (bash scripts/compiled.sh build) or go back to pure "
                "Python (bash scripts/compiled.sh remove)"
            )


def is_compiled(name: str) -> bool:
    """True if module ``name`` is imported (importing it if need be) from an extension."""
    module = sys.modules.get(name) or importlib.import_module(name)
    return (getattr(module, "__file__", None) or "").endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def status() -> dict[str, bool]:
    """Each module of :data:`MODULES` and whether it runs compiled."""
    return {name: is_compiled(name) for name in MODULES}


def summary() -> str:
    """One line: ``yes (N modules)``, ``no`` or ``partly (the compiled ones)``."""
    state = status()
    done = [name for name, compiled in state.items() if compiled]
    if not done:
        return "no"
    if len(done) == len(state):
        return f"yes ({len(done)} modules: mypyc)"
    return f"partly ({', '.join(done)})"
