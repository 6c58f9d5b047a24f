"""A tiny plain-HTTP server for a broker's statistics, on its own Unix socket.

``GET /metrics`` answers the Prometheus text exposition, ``GET /stats`` the same numbers as
JSON; anything else is ``404`` (``405`` for another method). One request per connection,
``Connection: close``. It is kept off the bus socket on purpose: a scraper must never be
mistaken for a worker, and a busy bus must never delay a scrape (or the other way round).

The same hardening as the bus socket: the file is created 0600 by default and never
replaces a live socket or a symlink, a peer whose uid is not trusted is refused, a
request head is capped at :data:`MAX_REQUEST_HEAD` bytes and must arrive within
:data:`REQUEST_TIMEOUT` seconds.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection
from typing import Any

import anyio
import h11
from anyio.abc import ByteStream, TaskStatus

from shared.listener import accept_forever
from shared.logutil import LogLimiter
from shared.peercred import peer_credentials
from shared.stats import broker_metrics, process_memory, statistics_json
from shared.transport import open_unix_listener, parse_address

__all__ = ["MAX_REQUEST_HEAD", "REQUEST_TIMEOUT", "fetch_stats", "serve_stats"]

logger = logging.getLogger(__name__)

#: A scrape request is a few hundred bytes; 8 KiB leaves room for proxies' headers.
MAX_REQUEST_HEAD = 8 * 1024
#: Seconds a client has to send its request (a slowloris scraper is dropped).
REQUEST_TIMEOUT = 5.0
_CONTENT_TYPES = {
    "/metrics": b"text/plain; version=0.0.4; charset=utf-8",
    "/stats": b"application/json",
}


async def serve_stats(
    address: str,
    statistics: Callable[[], Any],
    *,
    mode: int = 0o600,
    group: str | int | None = None,
    allowed_uids: Collection[int] | None = None,
    task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``statistics()`` (a ``BrokerStatistics``) on ``address`` until cancelled.

    Raises:
        AddressInUse: something live already listens on the path.
        OSError: the path exists and is not a socket.
    """
    path = parse_address(address)
    listener = await open_unix_listener(path, mode=mode, group=group)
    inode = os.stat(path).st_ino
    limiter = LogLimiter(logger)

    async def handle(stream: ByteStream) -> None:
        async with stream:
            creds = peer_credentials(stream)
            if allowed_uids is not None and creds is not None and creds.uid not in allowed_uids:
                limiter.log(logging.WARNING, "stats: refusing pid %d: uid %d is not trusted", creds.pid, creds.uid)
                return
            with anyio.move_on_after(REQUEST_TIMEOUT):
                try:
                    await _answer(stream, statistics)
                except (anyio.BrokenResourceError, anyio.EndOfStream, OSError) as exc:
                    logger.debug("stats: client went away: %r", exc)

    async with listener:
        try:
            logger.info("statistics served on %s (GET /metrics, GET /stats)", address)
            task_status.started(address)
            async with anyio.create_task_group() as tg:
                await accept_forever(
                    listener, handle, tg,
                    lambda exc: limiter.log(logging.WARNING, "stats: cannot accept a connection: %s", exc),
                )
        finally:
            try:
                if os.lstat(path).st_ino == inode:
                    os.unlink(path)
            except FileNotFoundError:
                pass


async def _answer(stream: ByteStream, statistics: Callable[[], Any]) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            await _respond(stream, conn, exc.error_status_hint, f"bad request: {exc}\n".encode(), b"text/plain")
            return
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive(MAX_REQUEST_HEAD)
            except anyio.EndOfStream:
                data = b""
            conn.receive_data(data)
            continue
        if isinstance(event, h11.ConnectionClosed):
            return
        if isinstance(event, h11.Request):
            break
    target = event.target.split(b"?", 1)[0].decode("ascii", "replace")
    if event.method not in (b"GET", b"HEAD"):
        await _respond(stream, conn, 405, b"use GET\n", b"text/plain")
    elif target not in _CONTENT_TYPES:
        await _respond(stream, conn, 404, b"try /metrics or /stats\n", b"text/plain")
    else:
        stats = statistics()
        memory = process_memory()
        text = broker_metrics(stats, memory=memory) if target == "/metrics" else statistics_json(stats, memory=memory)
        body = text.encode()
        await _respond(stream, conn, 200, b"" if event.method == b"HEAD" else body, _CONTENT_TYPES[target], len(body))


async def _respond(
    stream: ByteStream, conn: h11.Connection, status: int, body: bytes, ctype: bytes, length: int | None = None
) -> None:
    headers = [
        (b"Content-Type", ctype),
        (b"Content-Length", str(len(body) if length is None else length).encode()),
        (b"Connection", b"close"),
    ]
    try:
        out = conn.send(h11.Response(status_code=status, headers=headers)) or b""
        if body:
            out += conn.send(h11.Data(data=body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
    except h11.LocalProtocolError:
        return  # h11 refuses to answer in this state (the request was unparseable twice)
    await stream.send(out)


def fetch_stats(address: str, *, as_json: bool = False, timeout: float = 5.0) -> str:
    """Fetch ``/metrics`` (or ``/stats``) from a stats socket; blocking, for the CLI.

    Raises:
        httpx.HTTPError: unreachable, or an answer other than 200.
    """
    import httpx

    path = parse_address(address)
    with httpx.Client(transport=httpx.HTTPTransport(uds=path), timeout=timeout) as client:
        response = client.get("http://workerbus/stats" if as_json else "http://workerbus/metrics")
        response.raise_for_status()
        return response.text
