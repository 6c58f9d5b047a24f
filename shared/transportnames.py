"""Transport names to transport objects, for the edges (``join``, the integrations, the CLI).

The core (broker, client) imports no transport; this module sits above the transports and
imports the one a name asks for, so ``join(transport="stream")`` loads ``streambus`` and
nothing else. See docs/architecture.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from .transport import Transport, get_transport

__all__ = ["TRANSPORT_NAMES", "load_transport", "with_transport"]

#: name -> the package that registers it when imported.
TRANSPORT_NAMES = {"http": "httpbus", "stream": "streambus"}


def load_transport(name: str | Transport, *, max_header_bytes: int | None = None) -> Transport:
    """``"http"``/``"stream"`` (importing its package) or a transport object → the transport.

    ``max_header_bytes`` (http only) gives a broker-side http transport with that limit.

    Raises:
        ValueError: unknown name, or ``max_header_bytes`` for another transport.
    """
    if max_header_bytes is not None and name != "http":
        raise ValueError("max_header_bytes applies to the http transport only")
    if not isinstance(name, str):
        return name
    package = TRANSPORT_NAMES.get(name)
    if package is None:
        raise ValueError(f"unknown transport {name!r}: expected 'http' or 'stream'")
    importlib.import_module(package)
    if max_header_bytes is not None:
        from httpbus.transport import HttpTransport

        return HttpTransport(max_header_bytes=max_header_bytes)
    return get_transport(name)


def with_transport(options: Mapping[str, Any]) -> dict[str, Any]:
    """Client options with ``transport`` (a name, default ``"http"``) made an object.

    For the integrations' non-embedded mode, whose ``transport`` option mirrors ``join``'s.
    """
    resolved = dict(options)
    resolved["transport"] = load_transport(resolved.get("transport", "http"))
    return resolved
