"""workerbus core: codec, framing, routing, and the transport-agnostic broker and client.

``streambus`` and ``httpbus`` are the two thin transports over this package. The wire
contract is docs/protocol.md.
"""

from __future__ import annotations

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

__all__ = [
    "ALL",
    "CURRENT",
    "LIFECYCLE_SOURCE",
    "NATIVE",
    "OTHERS",
    "AddressInUse",
    "BarrierBroken",
    "Broker",
    "BrokerStatistics",
    "BusError",
    "Client",
    "ClientStatistics",
    "Event",
    "HandshakeError",
    "LocalProtocolError",
    "NoWelcome",
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
