"""The negotiated native extensions (docs/protocol.md §8): the welcome, the ping/pong
barrier, and old-style hellos that must not see either.

A broker that does not implement the extensions is still a correct broker (they are
negotiated); tell the kit with ``--no-extensions`` and the extension cases are skipped. The
plain-hello case runs either way.
"""

from __future__ import annotations

import os
from typing import Any

from shared.tools.conformance.casekit import CaseFailed, CaseSkipped, Ctx, case
from shared.tools.conformance.profiles import DecodeError, hexabbr
from shared.tools.conformance.wire import Conn, PeerClosed, WaitTimeout

#: What the kit asks for; the last name is unknown and must not be granted.
ASKED = ["welcome", "barrier", "x-conformance-unknown"]
WELCOME_KEYS = {"welcome", "broker", "profile", "id", "caps", "max_payload_len",
                "max_queue_len", "unique_timeout"}
#: Foreign deliveries (e.g. an embedded broker's lifecycle events) skipped at most.
MAX_SKIPPED = 1000
#: Publishes before the ping of the barrier case.
BARRIER_BURST = 200
NATIVE_ONLY = "the kong profile has no negotiated extensions (lua-resty-events has none)"


def _require_extensions(ctx: Ctx) -> None:
    if not ctx.cfg.extensions:
        raise CaseSkipped("told --no-extensions")


def _hello_with_caps(ctx: Ctx, wid: int, caps: list[str]) -> bytes:
    return ctx.profile.encode({"id": wid, "pid": os.getpid(), "caps": caps})


def _worker_with_caps(ctx: Ctx, wid: int, caps: list[str]) -> tuple[Conn, dict[Any, Any]]:
    """A connected worker that asked for ``caps``; returns it and its checked welcome."""
    conn = ctx.connect()
    conn.label = f"worker {wid}"
    if ctx.cfg.transport == "http":
        ctx.upgrade(conn)
    hello = _hello_with_caps(ctx, wid, caps)
    conn.send(ctx.profile.frame(hello))
    who = f"worker {wid} (hello with caps {caps})"
    try:
        first = conn.read_frame(ctx.deadline, "the welcome")
    except (PeerClosed, WaitTimeout) as exc:
        raise CaseFailed(f"{who}: expected a welcome frame first: {exc}") from exc
    msg = ctx.profile.decode(first)
    if not isinstance(msg, dict) or next(iter(msg), None) != "welcome":
        raise CaseFailed(f"{who}: expected a welcome frame (a map whose first key is "
                         f"'welcome') first, got {hexabbr(first, 48)}")
    return conn, msg


def _is_control(ctx: Ctx, frame: bytes) -> bool:
    """A map without "source": what control frames look like (never an event)."""
    try:
        msg = ctx.profile.decode(frame)
    except DecodeError:
        return False
    return isinstance(msg, dict) and "source" not in msg


def _ping(ctx: Ctx, n: int) -> bytes:
    return ctx.profile.frame(ctx.profile.encode({"ping": n}))


def _read_pong(ctx: Ctx, conn: Conn, n: int, who: str, limit: int) -> int:
    """Skip deliveries until the pong ``n``; returns how many were skipped."""
    expected = ctx.profile.encode({"pong": n})
    for skipped in range(limit):
        try:
            frame = conn.read_frame(ctx.deadline, f"pong {n}")
        except (PeerClosed, WaitTimeout) as exc:
            raise CaseFailed(f"{who}: sent ping {n}, no pong after {skipped} deliveries: "
                             f"{exc}") from exc
        if frame == expected:
            return skipped
        if _is_control(ctx, frame):
            raise CaseFailed(f"{who}: expected pong {n} = {hexabbr(expected)}, got another "
                             f"control frame {hexabbr(frame, 48)}")
    raise CaseFailed(f"{who}: sent ping {n}, no pong within {limit} deliveries")


@case("native.welcome", "a hello with caps gets a welcome first: its fields, our id, limits, "
      "only known caps granted", native_only=NATIVE_ONLY)
def welcome(ctx: Ctx) -> None:
    _require_extensions(ctx)
    wid = ctx.id0
    conn, msg = _worker_with_caps(ctx, wid, ASKED)
    who = f"worker {wid}'s welcome {msg!r}"
    missing = WELCOME_KEYS - set(msg)
    if missing:
        raise CaseFailed(f"{who}: missing keys {sorted(missing)}")
    if msg["welcome"] != 1 or msg["profile"] != "native":
        raise CaseFailed(f"{who}: expected version 1 and profile 'native'")
    if msg["id"] != wid:
        raise CaseFailed(f"{who}: expected the id of our hello, {wid}")
    if not isinstance(msg["broker"], str) or not msg["broker"]:
        raise CaseFailed(f"{who}: 'broker' must name the broker")
    caps = msg["caps"]
    if not isinstance(caps, list) or "welcome" not in caps or not set(caps) <= set(ASKED[:2]):
        raise CaseFailed(f"{who}: 'caps' must list what was asked and is known (at least "
                         f"'welcome'), never {ASKED[2]!r}")
    for key in ("max_payload_len", "max_queue_len"):
        if type(msg[key]) is not int or msg[key] < 1:
            raise CaseFailed(f"{who}: {key!r} must be an integer >= 1")
    limit = ctx.cfg.max_payload
    if limit is not None and msg["max_payload_len"] != limit:
        raise CaseFailed(f"{who}: told --max-payload {limit}, the welcome says "
                         f"{msg['max_payload_len']}")
    timeout = msg["unique_timeout"]
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise CaseFailed(f"{who}: 'unique_timeout' must be a number > 0")
    # After the welcome the connection works as any other.
    ctx.roundtrip(conn, wid, f"worker {wid} after its welcome")


@case("native.barrier", "the pong comes only after every earlier publish was routed",
      native_only=NATIVE_ONLY)
def barrier(ctx: Ctx) -> None:
    _require_extensions(ctx)
    sub_id, pub_id, late_id = ctx.id0, ctx.id0 + 1, ctx.id0 + 2
    (sub,) = ctx.join([sub_id])
    pub, msg = _worker_with_caps(ctx, pub_id, ["welcome", "barrier"])
    if "barrier" not in (msg.get("caps") or []):
        raise CaseFailed(f"worker {pub_id}: asked for 'barrier', the welcome grants "
                         f"{msg.get('caps')!r}")
    # A burst and the ping in one send: the broker reads them together.
    burst = [ctx.event(pub_id, f"burst-{i}") for i in range(BARRIER_BURST)]
    pub.send(b"".join(ctx.publish_frame({"others": True}, e) for e in burst) + _ping(ctx, 1))
    _read_pong(ctx, pub, 1, f"worker {pub_id}", 10)
    # Routed by now: a publish made after the pong must reach the subscriber after all of
    # them (one queue, FIFO).
    late = ctx.worker(late_id)
    marker = ctx.event(late_id, "after-the-pong")
    ctx.publish(late, {"worker": sub_id}, marker)
    got = ctx.collect(sub, marker, f"worker {sub_id}")
    if got != [*burst, marker]:
        early = [f for f in got if f not in burst]
        raise CaseFailed(
            f"worker {sub_id}: expected the {BARRIER_BURST} events published before the ping, "
            f"then {ctx.describe([marker])}; got {len(got)} deliveries, "
            f"{ctx.describe(early[:3])} among the first: the pong came before the burst was "
            f"routed")


@case("native.pong-overflow", "a pong is not an event: a full queue neither drops nor "
      "delays it past the queued events", native_only=NATIVE_ONLY)
def pong_overflow(ctx: Ctx) -> None:
    _require_extensions(ctx)
    wid = ctx.id0
    conn, msg = _worker_with_caps(ctx, wid, ["welcome", "barrier"])
    queue_len = msg.get("max_queue_len")
    if type(queue_len) is not int or queue_len > 40_000:
        raise CaseSkipped(f"max_queue_len {queue_len!r} too large to overflow in a case")
    # Publish to ourselves without reading: our own queue overflows; then ping.
    count = queue_len + 100
    inner = ctx.event(wid, "fill")
    frame = ctx.publish_frame({"worker": wid}, inner)
    for start in range(0, count, 1000):
        conn.send(frame * min(1000, count - start))
    conn.send(_ping(ctx, 7))
    skipped = _read_pong(ctx, conn, 7, f"worker {wid}", count + 10)
    if skipped > count:
        raise CaseFailed(f"worker {wid}: {skipped} deliveries before the pong, more than the "
                         f"{count} publishes")


@case("native.plain-hello", "a hello without caps gets no welcome and no control frame: "
      "served exactly as before")
def plain_hello(ctx: Ctx) -> None:
    wid = ctx.id0
    conn = ctx.worker(wid)  # (a plain {"id", "pid"} hello)
    probe = ctx.event(wid, "plain")
    ctx.publish(conn, {}, probe)
    for _ in range(MAX_SKIPPED):
        try:
            frame = conn.read_frame(ctx.deadline, "our echo")
        except (PeerClosed, WaitTimeout) as exc:
            raise CaseFailed(f"worker {wid} (plain hello): expected its echo: {exc}") from exc
        if _is_control(ctx, frame):
            raise CaseFailed(f"worker {wid} (plain hello): got a control frame "
                             f"{hexabbr(frame, 48)}; a hello without caps must be served "
                             f"exactly as before (no welcome)")
        if frame == probe:
            return
    raise CaseFailed(f"worker {wid} (plain hello): no echo within {MAX_SKIPPED} deliveries")
