"""Connection-start cases: the HTTP upgrade, its rejections, the deadline, pipelining."""

from __future__ import annotations

import time

from shared.tools.conformance.casekit import CaseFailed, Ctx, case
from shared.tools.conformance.profiles import hexabbr
from shared.tools.conformance.wire import (
    UPGRADE_REQUEST,
    UPGRADE_TOKEN,
    Conn,
    PeerClosed,
    WaitTimeout,
)

#: Pause between single-byte sends of the dribble case: long enough that the broker's reads
#: really see one byte at a time, short enough that ~200 bytes take well under a second.
DRIBBLE_PAUSE = 0.001


def _upgrade_and_use(ctx: Ctx, request: bytes) -> None:
    """``request`` must get a 101, and the connection must then work as a worker."""
    wid = ctx.id0
    conn = ctx.connect()
    ctx.upgrade(conn, request)
    conn.send(ctx.profile.frame(ctx.hello(wid)))
    ctx.roundtrip(conn, wid, f"worker {wid} after {request!r}")


@case("basic.roundtrip", "connect (+ upgrade), hello, publish to all: the publisher gets it back")
def roundtrip(ctx: Ctx) -> None:
    conn = ctx.worker(ctx.id0)
    ctx.roundtrip(conn, ctx.id0, f"worker {ctx.id0}")


@case("handshake.exact", "the exact 87-byte request gets a 101; the connection then works",
      http_only=True)
def exact(ctx: Ctx) -> None:
    _upgrade_and_use(ctx, UPGRADE_REQUEST)


@case("handshake.header-case", "lower/upper-case header names and a lower-case token",
      http_only=True)
def header_case(ctx: Ctx) -> None:
    _upgrade_and_use(
        ctx,
        b"GET / HTTP/1.1\r\nhost: localhost\r\nCONNECTION: upgrade\r\n"
        b"upgrade: kong-worker-events/1\r\n\r\n",
    )


@case("handshake.extra-headers", "unknown extra request headers are ignored", http_only=True)
def extra_headers(ctx: Ctx) -> None:
    _upgrade_and_use(
        ctx,
        b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: conformance-kit\r\n"
        b"Connection: Upgrade\r\nAccept: */*\r\nUpgrade: Kong-Worker-Events/1\r\n"
        b"X-Conformance: 1\r\n\r\n",
    )


@case("handshake.header-order", "headers in a different order", http_only=True)
def header_order(ctx: Ctx) -> None:
    _upgrade_and_use(
        ctx,
        b"GET / HTTP/1.1\r\nUpgrade: Kong-Worker-Events/1\r\nConnection: Upgrade\r\n"
        b"Host: localhost\r\n\r\n",
    )


@case("handshake.connection-list", "Connection: keep-alive, Upgrade is accepted", http_only=True)
def connection_list(ctx: Ctx) -> None:
    _upgrade_and_use(
        ctx,
        b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive, Upgrade\r\n"
        b"Upgrade: Kong-Worker-Events/1\r\n\r\n",
    )


@case("handshake.other-path", "any request path is accepted", http_only=True)
def other_path(ctx: Ctx) -> None:
    _upgrade_and_use(
        ctx,
        b"GET /events/bus?x=1 HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
        b"Upgrade: Kong-Worker-Events/1\r\n\r\n",
    )


def _expect_rejection(ctx: Ctx, request: bytes, status: int) -> None:
    """``request`` must get ``status`` with a non-empty body, then the connection closes."""
    conn = ctx.connect()
    conn.send(request)
    head = ctx.read_response(conn, request)
    sent = f"sent {hexabbr(request, 48)}"
    if head.status != status:
        raise CaseFailed(f"{sent}, expected status {status}, got {head.status} {head.reason}")
    if status == 426 and not any(v.lower() == UPGRADE_TOKEN.lower() for v in head.values("Upgrade")):
        raise CaseFailed(f"{sent}, expected 426 with Upgrade: {UPGRADE_TOKEN}, got {head.headers}")
    lengths = head.values("Content-Length")
    try:
        if lengths and lengths[0].isdigit():
            body = conn.recv_exact(int(lengths[0]), ctx.deadline, "the response body")
            closed = conn.closed_by_peer(ctx.deadline)
        else:
            # No length: the body runs until the close, which we expect anyway.
            body = conn.read_until_close(ctx.deadline, "the response body and the close")
            closed = True
    except (PeerClosed, WaitTimeout) as exc:
        raise CaseFailed(f"{sent}, expected a {status} body: {exc}") from exc
    if not body.strip():
        raise CaseFailed(f"{sent}, expected a non-empty body with the {status}, got {body!r}")
    if not closed:
        raise CaseFailed(f"{sent}, expected the connection closed after the {status}, still open")


@case("reject.no-upgrade", "a GET without Upgrade gets 426 + Upgrade header + body, then close",
      http_only=True)
def no_upgrade(ctx: Ctx) -> None:
    _expect_rejection(ctx, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", 426)


@case("reject.wrong-token", "Upgrade: websocket gets 426 + body, then close", http_only=True)
def wrong_token(ctx: Ctx) -> None:
    _expect_rejection(
        ctx,
        b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        426,
    )


@case("reject.method", "POST with the right token gets 405 + body, then close", http_only=True)
def wrong_method(ctx: Ctx) -> None:
    _expect_rejection(
        ctx,
        b"POST / HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
        b"Upgrade: Kong-Worker-Events/1\r\nContent-Length: 0\r\n\r\n",
        405,
    )


@case("reject.garbage", "non-HTTP bytes on the HTTP socket get 400 + body, then close",
      http_only=True)
def garbage(ctx: Ctx) -> None:
    # A raw hello frame, what a stream-flavour client would send first. A blank line follows
    # so that an HTTP parser has a complete (malformed) head to judge instead of waiting.
    raw = ctx.profile.frame(ctx.hello(ctx.id0)) + b"\r\n\r\n"
    _expect_rejection(ctx, raw, 400)


@case("deadline.idle-peers",
      "silent, handshake-only and half-hello peers are all closed within the handshake deadline")
def idle_peers(ctx: Ctx) -> None:
    deadline = ctx.cfg.handshake_deadline
    peers: list[tuple[str, Conn]] = [("a silent peer", ctx.connect())]
    hello = ctx.profile.frame(ctx.hello(ctx.id0 + 1))
    if ctx.cfg.transport == "http":
        only_head = ctx.connect()
        only_head.send(UPGRADE_REQUEST)
        peers.append(("a peer that upgraded but sent no hello", only_head))
        half = ctx.connect()
        half.send(UPGRADE_REQUEST + hello[: len(hello) // 2])
    else:
        half = ctx.connect()
        half.send(hello[: len(hello) // 2])
    peers.append(("a peer that sent half a hello frame", half))
    # All started together: one absolute limit covers every peer.
    limit = time.monotonic() + deadline + 2.0
    for what, conn in peers:
        if not conn.closed_by_peer(limit):
            raise CaseFailed(
                f"{what}: expected the broker to disconnect it within the handshake deadline "
                f"({deadline:g}s, waited {deadline + 2:g}s), still open"
            )


def _start_bytes(ctx: Ctx, wid: int, inner: bytes) -> bytes:
    """Handshake (http) + hello + publish(all) as one byte string."""
    head = UPGRADE_REQUEST if ctx.cfg.transport == "http" else b""
    return head + ctx.profile.frame(ctx.hello(wid)) + ctx.publish_frame({}, inner)


def _started_worker(ctx: Ctx, conn: Conn, sent: bytes) -> None:
    if ctx.cfg.transport == "http":
        ctx.check_101(conn, sent)


@case("pipeline.one-send", "handshake + hello + publish in ONE send: the publish is delivered")
def one_send(ctx: Ctx) -> None:
    bystander = ctx.worker(ctx.id0 + 1)
    ctx.roundtrip(bystander, ctx.id0 + 1, "bystander")
    wid = ctx.id0
    inner = ctx.event(wid, "pipelined")
    data = _start_bytes(ctx, wid, inner)
    conn = ctx.connect()
    conn.send(data)
    _started_worker(ctx, conn, data)
    ctx.expect(conn, [inner], f"pipelining worker {wid}")
    ctx.expect(bystander, [inner], "bystander")


@case("pipeline.dribble", "handshake + hello + publish sent one byte at a time")
def dribble(ctx: Ctx) -> None:
    wid = ctx.id0
    inner = ctx.event(wid, "dribbled")
    data = _start_bytes(ctx, wid, inner)
    conn = ctx.connect()
    for i in range(len(data)):
        conn.send(data[i : i + 1])
        time.sleep(DRIBBLE_PAUSE)
    _started_worker(ctx, conn, data)
    ctx.expect(conn, [inner], f"dribbling worker {wid}")
