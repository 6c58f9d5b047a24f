"""The layers only point down (docs/architecture.md), checked on what a fresh interpreter loads.

Import statements can lie (a lazy import inside a function, a package ``__init__`` that pulls
in its siblings), so each check starts a new interpreter, imports one layer and reads
``sys.modules``: nothing from a higher layer may be there.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: Bottom to top. Every module of the project sits in exactly one layer (a new module that
#: is in none fails test_every_module_has_a_layer: put it where it belongs).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # sans-IO or pure pieces and small OS helpers: no broker, no client. ``shared`` itself
    # (the package entry) runs nothing: its public names load on first use (PEP 562).
    ("pure", ("shared", "shared.frame", "shared.codec", "shared.profile", "shared.luabuf", "shared.messages",
              "shared.router", "shared.stream", "shared.errors", "shared.logutil", "shared.unixpath",
              "shared.stats", "shared.peercred", "shared.sockets", "shared.memtrim", "shared.nodewid",
              "shared.compiled")),
    # the core: broker and client over any transport object, and the seams they offer
    ("core", ("shared.transport", "shared.listener", "shared.broker", "shared.client", "shared.dispatch",
              "shared.testing", "shared.bridge", "shared.sequence", "shared.subscription")),
    # the transports: how a connection starts
    ("transports", ("httpbus", "httpbus.handshake", "httpbus.transport",
                    "streambus", "streambus.transport")),
    # the edges a program meets: names -> transports, embedding, integrations, cluster engines
    ("edges", ("shared.transportnames", "shared.embed", "shared.hosting", "shared.election", "shared.blocking",
               "shared.numbered",
               "shared.integrations", "shared.integrations.*", "shared.bridges", "shared.bridges.*")),
    # the tools: command line, demos, stats server, live view, bench suite, conformance kit
    ("tools", ("shared.tools", "shared.tools.*")),
]

#: Third-party modules only a layer at or above the given one may load.
THIRD_PARTY_FLOOR = {"h11": "transports", "httpx": "tools", "zmq": "tools", "rich": "tools"}


def _matches(module: str, pattern: str) -> bool:
    if pattern.endswith(".*"):
        return module.startswith(pattern[:-1])
    return module == pattern


def layer_of(module: str) -> int | None:
    for index, (_, patterns) in enumerate(LAYERS):
        if any(_matches(module, p) for p in patterns):
            return index
    return None


def _project_modules() -> list[str]:
    names = []
    for package in ("shared", "httpbus", "streambus"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__main__":
                continue
            if parts[-1] == "__init__":
                parts.pop()
            names.append(".".join(parts))
    return names


def _loaded_after(code: str) -> list[str]:
    """The modules in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    loaded: list[str] = json.loads(run.stdout.splitlines()[-1])
    return loaded


def test_every_module_has_a_layer() -> None:
    unplaced = [m for m in _project_modules() if layer_of(m) is None]
    assert not unplaced, f"put these in a layer of tests/test_layers.py (and docs/architecture.md): {unplaced}"


@pytest.mark.parametrize("index", range(len(LAYERS) - 1), ids=[name for name, _ in LAYERS[:-1]])
def test_a_layer_loads_nothing_above_it(index: int) -> None:
    name, _ = LAYERS[index]
    modules = [m for m in _project_modules() if layer_of(m) == index]
    assert modules
    loaded = _loaded_after("\n".join(f"import {m}" for m in modules))
    above = sorted(m for m in loaded if (layer_of(m) or 0) > index)
    assert not above, f"importing the {name} layer loads {above}"
    for dependency, floor in THIRD_PARTY_FLOOR.items():
        if index < [n for n, _ in LAYERS].index(floor):
            assert dependency not in loaded, f"importing the {name} layer loads {dependency}"


def test_the_core_knows_no_transport() -> None:
    # A client and a broker can be built and resolve no name: no transport package appears.
    loaded = _loaded_after(
        "from shared import Broker, Client\n"
        "try:\n"
        "    Client('unix:/x', transport='http')\n"
        "except ValueError as exc:\n"
        "    assert 'import httpbus' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('a transport name resolved with no transport imported')\n"
    )
    assert not [m for m in loaded if m.startswith(("httpbus", "streambus", "h11"))]


def test_a_transport_name_works_once_its_package_is_imported() -> None:
    _loaded_after(
        "import streambus\n"
        "from shared import Client\n"
        "assert Client('unix:/x', transport='stream').transport is streambus.TRANSPORT\n"
    )


def test_import_shared_loads_only_the_library_entry() -> None:
    run = subprocess.run([sys.executable, "-X", "importtime", "-c", "import shared"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if "|" in line]
    assert "shared" in imported
    banned = ("shared.tools", "httpbus", "streambus", "h11", "httpx")
    assert not [m for m in imported if m.startswith(banned) or ".bench" in m or ".conformance" in m]
    # Lazy (PEP 562): the broker and client load on first use, not on ``import shared``.
    assert not [m for m in imported if m.startswith("shared.")]


def test_the_conformance_kit_loads_none_of_the_library() -> None:
    """The kit is a black box: every one of its modules, and its command line, loaded.

    Allowed from the library: the ``shared`` package entry (lazy, runs nothing) and
    ``shared.unixpath`` (a leaf with no project imports, the one rule for socket paths).
    The kong profile borrows ``shared.luabuf`` when a kong payload is decoded; not here.
    """
    loaded = _loaded_after(
        "import pkgutil, importlib, shared.tools.conformance as kit\n"
        "for info in pkgutil.walk_packages(kit.__path__, kit.__name__ + '.'):\n"
        "    importlib.import_module(info.name)\n"
        "from shared.tools.conformance.__main__ import main\n"
        "from shared.tools.conformance.profiles import PROFILES\n"
        "native = PROFILES['native']\n"
        "assert native.decode(native.encode({'a': 1})) == {'a': 1}\n"
        "try:\n"
        "    main(['broker', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
    )
    library = [m for m in loaded if m.startswith(("shared", "httpbus", "streambus"))
               and not m.startswith(("shared.tools", "shared.unixpath")) and m != "shared"]
    assert not library, f"the conformance kit loads the library: {library}"
    assert "asyncio" not in loaded  # the kit is plain blocking sockets, on any broker
