"""streambus: the bus over a raw Unix stream socket (frames from the first byte).

    async with streambus.connect("unix:/run/app/bus.sock", worker_id=0) as bus:
        bus.subscribe("cache", "*", on_cache_event)
        await bus.publish("cache", "invalidate", {"key": "user:1"})

    await streambus.Broker().serve("unix:/run/app/bus.sock")
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from shared.broker import Broker as _Broker
from shared.client import Client

from .transport import TRANSPORT, StreamTransport

__all__ = ["TRANSPORT", "Broker", "Client", "StreamTransport", "connect"]


def Broker(**options: Any) -> _Broker:
    """A :class:`shared.broker.Broker` on the stream transport."""
    return _Broker(transport=TRANSPORT, **options)


@asynccontextmanager
async def connect(address: str, **options: Any) -> AsyncIterator[Client]:
    """A running :class:`shared.client.Client` on the stream transport."""
    async with Client(address, transport=TRANSPORT, **options) as client:
        yield client
