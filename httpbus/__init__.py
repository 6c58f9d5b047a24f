"""httpbus: the bus over HTTP/1.1 Upgrade: Kong-Worker-Events/1, then the same frames.

    async with httpbus.connect("unix:/run/app/bus.sock", worker_id=0) as bus:
        bus.subscribe("cache", "*", on_cache_event)
        await bus.publish("cache", "invalidate", {"key": "user:1"})

    await httpbus.Broker().serve("unix:/run/app/bus.sock")
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from shared.broker import Broker as _Broker
from shared.client import Client

from .transport import TRANSPORT, HttpTransport

__all__ = ["TRANSPORT", "Broker", "Client", "HttpTransport", "connect"]


def Broker(*, max_header_bytes: int | None = None, **options: Any) -> _Broker:
    """A :class:`shared.broker.Broker` on the HTTP transport.

    ``max_header_bytes``: the largest upgrade request head accepted (an HTTP-only option,
    so it lives here and on :class:`HttpTransport`, not in the core broker).
    """
    transport = TRANSPORT if max_header_bytes is None else HttpTransport(max_header_bytes=max_header_bytes)
    return _Broker(transport=transport, **options)


@asynccontextmanager
async def connect(address: str, **options: Any) -> AsyncIterator[Client]:
    """A running :class:`shared.client.Client` on the HTTP transport."""
    async with Client(address, transport=TRANSPORT, **options) as client:
        yield client
