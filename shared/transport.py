"""What a transport is, and addresses.

A transport only knows how a connection *starts*: ``streambus`` sends frames at once,
``httpbus`` first does an HTTP/1.1 upgrade. After that both hand a plain byte stream (plus
any bytes read past the handshake) to the shared core.
"""

from __future__ import annotations

import logging
from typing import Protocol

from anyio.abc import ByteStream

# The listener lives in shared/listener.py; re-exported for the stats server.
from .listener import open_unix_listener
from .unixpath import socket_path

__all__ = ["Transport", "get_transport", "open_unix_listener", "parse_address"]

logger = logging.getLogger(__name__)


class Transport(Protocol):
    """How one kind of connection starts, on each side."""

    name: str

    async def connect(self, path: str) -> tuple[ByteStream, bytes]:
        """Client side: connect to ``path`` and do the connection start.

        Returns the stream and the bytes read past the handshake.

        Raises:
            OSError: the socket could not be connected.
            HandshakeError: the connection start failed.
        """
        ...

    async def accept(self, stream: ByteStream) -> bytes:
        """Broker side: do the connection start on an accepted stream.

        Returns the bytes read past the handshake (the start of the frame stream).

        Raises:
            HandshakeError: the peer's connection start was refused (already answered).
        """
        ...

    # Optional, broker side (looked up with getattr, so a transport written before it
    # still fits): ``async def refuse(self, stream, status: int, text: str) -> None`` tells
    # a peer it is refused before its connection start (the broker is full, the uid is not
    # trusted), if the transport has a way to say so; the broker then closes. ``status`` is
    # the HTTP status that describes the refusal, ``text`` one line for a person.


def get_transport(name: str | Transport, *, max_header_bytes: int | None = None) -> Transport:
    """``"http"`` → :data:`httpbus.TRANSPORT`, ``"stream"`` → :data:`streambus.TRANSPORT`.

    ``max_header_bytes`` (http only) sets the largest request head the broker accepts.
    """
    if max_header_bytes is not None and name != "http":
        raise ValueError("max_header_bytes applies to the http transport only")
    if not isinstance(name, str):
        return name
    if name == "http":
        from httpbus.transport import TRANSPORT as http
        from httpbus.transport import HttpTransport

        return http if max_header_bytes is None else HttpTransport(max_header_bytes=max_header_bytes)
    if name == "stream":
        from streambus.transport import TRANSPORT as stream

        return stream
    raise ValueError(f"unknown transport {name!r}: expected 'http' or 'stream'")


def parse_address(address: str) -> str:
    """``unix:/abs/path.sock`` → ``/abs/path.sock``.

    Raises:
        ValueError: not a ``unix:`` address (lua-resty-events has the same rule), a relative
            path, or one longer than AF_UNIX allows.
    """
    return socket_path(address)
