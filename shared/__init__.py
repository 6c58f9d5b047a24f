"""workerbus core: codec, framing, routing, and the transport-agnostic broker and client.

``streambus`` and ``httpbus`` are the two thin transports over this package. The wire
contract is docs/protocol.md; the layers and their import rules are docs/architecture.md.

The names below are loaded on first use (PEP 562), so that importing a submodule
(``shared.unixpath``, ``shared.tools.conformance``) does not run the broker and client.
"""

from __future__ import annotations

import importlib
import os
from importlib.machinery import EXTENSION_SUFFIXES
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .broker import LIFECYCLE_SOURCE, Broker, BrokerStatistics
    from .client import Client, ClientStatistics, connect
    from .errors import (
        AddressInUse,
        BarrierBroken,
        BusError,
        HandshakeError,
        LocalProtocolError,
        NoWelcome,
        PayloadTooLarge,
        ProtocolError,
        PublishBufferFull,
        RemoteProtocolError,
        UpgradeRejected,
    )
    from .messages import ALL, CURRENT, OTHERS, Event, Target, TargetKind, parse_target
    from .profile import NATIVE, Profile, get_profile
    from .router import OverflowPolicy

def _check_compiled_build(directory: str) -> None:
    """Refuse an optional compiled build (docs/compiled.md) whose sources changed since it
    was built: its modules would run the old code without a word.

    The build records each compiled module's source hash in ``compiled.<abi>.json``
    (scripts/build_compiled.py); with no such file (the pure package) this is one failed
    ``open``. A source is hashed only when it is newer than its extension module. Here,
    not in a submodule, because ``import shared`` loads no submodule (docs/architecture.md).

    Raises:
        ImportError: a compiled module was built from other source bytes.
    """
    suffix = EXTENSION_SUFFIXES[0]
    record = os.path.join(directory, "compiled" + suffix.rsplit(".", 1)[0] + ".json")
    try:
        with open(record, "rb") as f:
            text = f.read()
    except OSError:
        return
    import hashlib
    import json

    rebuild = "rebuild it (bash scripts/compiled.sh build) or go back to pure Python (bash scripts/compiled.sh remove)"
    try:
        recorded = json.loads(text)
    except ValueError:
        recorded = None
    if not isinstance(recorded, dict):
        raise ImportError(f"workerbus: {record} is not a compiled build's record; {rebuild}")
    for name, digest in recorded.items():
        short = str(name).rpartition(".")[2]
        source = os.path.join(directory, short + ".py")
        try:
            if os.stat(source).st_mtime <= os.stat(os.path.join(directory, short + suffix)).st_mtime:
                continue
            with open(source, "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() == digest:
                    continue
        except OSError:
            continue  # a module that is not there (not compiled, or no source) is not stale
        raise ImportError(f"workerbus: the compiled {name} was built from another version of {source}; {rebuild}")


_check_compiled_build(os.path.dirname(os.path.abspath(__file__)))

#: public name -> the submodule that defines it.
_WHERE = {
    "LIFECYCLE_SOURCE": "broker",
    "Broker": "broker",
    "BrokerStatistics": "broker",
    "Client": "client",
    "ClientStatistics": "client",
    "connect": "client",
    "AddressInUse": "errors",
    "BarrierBroken": "errors",
    "BusError": "errors",
    "HandshakeError": "errors",
    "LocalProtocolError": "errors",
    "NoWelcome": "errors",
    "PayloadTooLarge": "errors",
    "ProtocolError": "errors",
    "PublishBufferFull": "errors",
    "RemoteProtocolError": "errors",
    "UpgradeRejected": "errors",
    "ALL": "messages",
    "CURRENT": "messages",
    "OTHERS": "messages",
    "Event": "messages",
    "Target": "messages",
    "TargetKind": "messages",
    "parse_target": "messages",
    "NATIVE": "profile",
    "Profile": "profile",
    "get_profile": "profile",
    "OverflowPolicy": "router",
}

__all__ = [
    "ALL",
    "AddressInUse",
    "BarrierBroken",
    "Broker",
    "BrokerStatistics",
    "BusError",
    "CURRENT",
    "Client",
    "ClientStatistics",
    "Event",
    "HandshakeError",
    "LIFECYCLE_SOURCE",
    "LocalProtocolError",
    "NATIVE",
    "NoWelcome",
    "OTHERS",
    "OverflowPolicy",
    "PayloadTooLarge",
    "Profile",
    "ProtocolError",
    "PublishBufferFull",
    "RemoteProtocolError",
    "Target",
    "TargetKind",
    "UpgradeRejected",
    "connect",
    "get_profile",
    "parse_target",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'shared' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
