"""workerbus core: codec, framing, routing, and the transport-agnostic broker and client.

``streambus`` and ``httpbus`` are the two thin transports over this package. The wire
contract is docs/protocol.md; the layers and their import rules are docs/architecture.md.

The names below are loaded on first use (PEP 562), so that importing a submodule
(``shared.unixpath``, ``shared.tools.conformance``) does not run the broker and client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .compiled import check_build as _check_build

# An optional compiled build (docs/compiled.md) must match its sources: checked before any
# compiled module can be imported.
_check_build()

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
