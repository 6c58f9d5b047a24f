"""Framing cases: sizes at the edges, bytes forwarded unchanged, one global order."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from shared.tools.conformance.casekit import SOURCE, CaseFailed, CaseSkipped, Ctx, case
from shared.tools.conformance.wire import Conn, wait_readable

#: How long frame.empty waits for the broker to drop the offender before probing the rest.
EMPTY_FRAME_GRACE = 1.0
ORDER_PUBLISHERS = 2
ORDER_SUBSCRIBERS = 3
ORDER_EVENTS = 200


@case("frame.empty", "a 0-byte frame after the hello: the broker survives, others keep working")
def empty(ctx: Ctx) -> None:
    bystander = ctx.worker(ctx.id0 + 1)
    ctx.roundtrip(bystander, ctx.id0 + 1, "bystander")
    offender = ctx.worker(ctx.id0)
    offender.send(ctx.profile.header(0))
    # An empty payload is no message, so a broker closes that connection; the contract only
    # promises that everyone else is unaffected, which is what is checked. Waiting (bounded)
    # for the close first makes sure the broker has read the empty frame before the probe.
    offender.closed_by_peer(time.monotonic() + EMPTY_FRAME_GRACE)
    ctx.check_bystander(bystander, ctx.id0 + 1)


@case("frame.one-byte", "a publish whose inner data is 1 byte: delivered as a 1-byte frame")
def one_byte(ctx: Ctx) -> None:
    wid = ctx.id0
    conn = ctx.worker(wid)
    # msgpack nil / LuaJIT nil: one byte. The broker forwards inner bytes without decoding.
    one = ctx.label(b"\xc0" if ctx.profile.native else b"\x00", "1-byte inner")
    marker = ctx.event(wid, "marker")
    conn.send(ctx.publish_frame({}, one) + ctx.publish_frame({}, marker))
    ctx.expect(conn, [one, marker], f"worker {wid}")


def _sized_inner(ctx: Ctx, wid: int, total: int) -> bytes:
    """An inner event whose publish payload is exactly ``total`` bytes long."""

    def outer_len(pad: int) -> int:
        return len(ctx.publish_payload({}, _inner(pad)))

    def _inner(pad: int) -> bytes:
        return ctx.profile.encode(
            {"source": SOURCE, "event": ctx.tagged("max"), "wid": wid,
             "data": b"m" * pad}
        )

    guess = total - outer_len(0)
    # Length headers widen at a few boundaries, so the linear guess may be a few bytes off;
    # try it first (payloads can be 16 MiB), then its neighbours.
    for pad in sorted(range(max(0, guess - 16), guess + 17), key=lambda p: abs(p - guess)):
        if outer_len(pad) == total:
            return ctx.label(_inner(pad), f"{total}-byte publish")
    raise CaseSkipped(f"cannot build a publish of exactly {total} bytes with this codec")


@case("frame.max", "a publish of exactly the maximum payload (65535 native; --max-payload or "
      "16 MiB-1 kong) is delivered intact")
def max_frame(ctx: Ctx) -> None:
    total = ctx.cfg.max_payload or ctx.profile.max_payload
    wid = ctx.id0
    conn, other = ctx.join([wid, wid + 1])
    inner = _sized_inner(ctx, wid, total)
    ctx.publish(conn, {}, inner)
    ctx.expect(conn, [inner], f"publisher {wid}")
    ctx.expect(other, [inner], f"receiver {wid + 1}")


@case("frame.oversize", "a frame announcing one byte over the broker's --max-payload closes "
      "that connection before the payload arrives; others keep working")
def oversize(ctx: Ctx) -> None:
    limit = ctx.cfg.max_payload
    if limit is None or limit >= ctx.profile.max_payload:
        raise CaseSkipped(
            f"the {ctx.profile.header_len}-byte header cannot announce more than "
            f"{ctx.profile.max_payload} bytes; give --max-payload when the broker enforces a "
            "lower limit"
        )
    bystander = ctx.worker(ctx.id0 + 1)
    ctx.roundtrip(bystander, ctx.id0 + 1, "bystander")
    offender = ctx.worker(ctx.id0)
    sent = ctx.profile.header(limit + 1) + b"\x00" * 16
    offender.send(sent)
    ctx.expect_closed(offender, "oversize sender", sent)
    ctx.check_bystander(bystander, ctx.id0 + 1)


def _u(n: int) -> bytes:
    """LuaJIT string.buffer small prefix integer (n <= 0xDF is one byte)."""
    if n > 0xDF:
        raise ValueError(n)
    return bytes([n])


def _odd_native(event: str, wid: int, with_data: bool) -> bytes:
    """A valid msgpack inner event that no msgpack encoder writes this way by default:
    str8 for short strings, uint32/int64 for small ints, map16 for small maps, unsorted keys."""

    def s8(text: str) -> bytes:
        raw = text.encode()
        return b"\xd9" + bytes([len(raw)]) + raw

    parts = [s8("wid"), b"\xce" + wid.to_bytes(4, "big"), s8("event"), s8(event)]
    parts += [b"\xda\x00\x06source", s8(SOURCE)]
    if with_data:
        data = b"\xde\x00\x02" + s8("b") + b"\xcb\x3f\xf8" + b"\x00" * 6
        data += s8("a") + b"\xd3" + (1).to_bytes(8, "big")
        parts += [s8("data"), data]
    return bytes([0x80 | (len(parts) // 2)]) + b"".join(parts)


def _odd_kong(event: str, wid: int, with_data: bool) -> bytes:
    """A valid LuaJIT string.buffer inner event in a shape a Python encoder would not pick:
    int32 numbers (what ARM64 LuaJIT writes), dictionary keys in reverse order."""

    def s(text: str) -> bytes:
        raw = text.encode()
        return _u(0x20 + len(raw)) + raw

    def int32(n: int) -> bytes:
        return b"\x06" + n.to_bytes(4, "little", signed=True)

    entries = [b"\x0f\x04" + int32(wid), b"\x0f\x03" + s(event), b"\x0f\x02" + s(SOURCE)]
    if with_data:
        entries.append(b"\x0f\x01\x0c\x03\x07" + (b"\x00" * 6 + b"\xf0\x3f") + int32(2))
    return b"\x09" + _u(len(entries)) + b"".join(entries)


@case("broadcast.bytes-unchanged",
      "a target-all delivery is byte-identical to the inner data, for every worker incl. the "
      "publisher (the inner bytes are deliberately non-canonical to catch re-encoding)")
def bytes_unchanged(ctx: Ctx) -> None:
    ids = [ctx.id0, ctx.id0 + 1, ctx.id0 + 2]
    conns = ctx.join(ids)
    build: Callable[[str, int, bool], bytes] = _odd_native if ctx.profile.native else _odd_kong
    inners = [
        ctx.label(build(ctx.tagged(f"odd-{n}"), ids[0], n == 0), f"odd-event-{n}")
        for n in range(2)
    ]
    for inner in inners:
        ctx.publish(conns[0], {}, inner)
    for conn, wid in zip(conns, ids, strict=True):
        ctx.expect(conn, inners, f"worker {wid}")


def _collect_all(ctx: Ctx, conns: dict[int, Conn], n: int) -> dict[int, list[bytes]]:
    """``n`` of this run's deliveries from every connection, read side by side.

    Reading all connections at once matters: a broker that writes with backpressure may be
    blocked on the one socket a sequential reader has not reached yet.
    """
    got: dict[int, list[bytes]] = {wid: [] for wid in conns}
    while any(len(v) < n for v in got.values()):
        if time.monotonic() > ctx.deadline or all(c.eof for c in conns.values()):
            short = {w: len(v) for w, v in got.items() if len(v) < n}
            raise CaseFailed(f"expected {n} deliveries on every worker, got only {short} "
                             f"within {ctx.cfg.case_timeout:g}s")
        wait_readable(list(conns.values()), min(ctx.deadline, time.monotonic() + 0.1))
        for wid, conn in conns.items():
            conn.pump()
            got[wid] += [f for f in conn.take_frames() if ctx.ours(f)]
    return {wid: v[:n] if len(v) == n else v for wid, v in got.items()}


def _first_diff(a: list[bytes], b: list[bytes]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@case("order.global-and-fifo",
      f"{ORDER_PUBLISHERS} publishers x {ORDER_EVENTS} interleaved events: every worker sees "
      "the same total order, each publisher's events in publish order")
def order(ctx: Ctx) -> None:
    pub_ids = [ctx.id0 + i for i in range(ORDER_PUBLISHERS)]
    sub_ids = [ctx.id0 + ORDER_PUBLISHERS + i for i in range(ORDER_SUBSCRIBERS)]
    check_order(ctx, pub_ids, sub_ids)


def check_order(ctx: Ctx, pub_ids: list[int], sub_ids: list[int], pre_created: int = 0) -> None:
    """``pub_ids`` publish interleaved bursts to all; every connection (publishers
    included) must see the same total order, with each publisher's events in publish order.
    Ids below ``pre_created`` are the broker's own (``--workers``).
    """
    ids = pub_ids + sub_ids
    conns = dict(zip(ids, ctx.join(ids, pre_created=pre_created), strict=True))
    events = {p: [ctx.event(p, f"p{p}-{i}") for i in range(ORDER_EVENTS)] for p in pub_ids}
    # Random-sized bursts per publisher, alternating, so arrivals really interleave.
    rng = random.Random(ctx.id0)
    pos = dict.fromkeys(pub_ids, 0)
    while any(pos[p] < ORDER_EVENTS for p in pub_ids):
        for p in pub_ids:
            end = min(ORDER_EVENTS, pos[p] + rng.randint(1, 8))
            conns[p].send(b"".join(ctx.publish_frame({}, e) for e in events[p][pos[p] : end]))
            pos[p] = end
        for conn in conns.values():
            conn.pump()
    total = ORDER_EVENTS * len(pub_ids)
    seqs = _collect_all(ctx, conns, total)
    # FIFO on every worker, not only on one: a broker may mistreat a single queue.
    for wid, seq in seqs.items():
        for p in pub_ids:
            own = set(events[p])
            mine = [f for f in seq if f in own]
            if mine != events[p]:
                at = _first_diff(mine, events[p])
                raise CaseFailed(
                    f"worker {wid}: publisher {p}'s events out of order at #{at}: expected "
                    f"{ctx.describe(events[p][at:at + 3])}, got {ctx.describe(mine[at:at + 3])}"
                )
    first_id = pub_ids[0]
    reference = seqs[first_id]
    for wid, seq in seqs.items():
        if seq != reference:
            at = _first_diff(seq, reference)
            raise CaseFailed(
                f"worker {wid} disagrees with worker {first_id} on the global order at #{at}: "
                f"{ctx.describe(seq[at:at + 3])} vs {ctx.describe(reference[at:at + 3])}"
            )
