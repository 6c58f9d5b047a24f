"""The ``unframed`` extension (docs/protocol.md §8): a worker that asked for it (with the
welcome) gets its deliveries as bare MessagePack objects back to back, the welcome
excepted; everyone else is served byte for byte as before.

Negotiated like the other native extensions: skipped with ``--no-extensions``, and skipped
(not failed) when the welcome does not grant ``unframed`` (a broker without it is correct).
"""

from __future__ import annotations

import msgpack

from shared.tools.conformance.casekit import CaseFailed, CaseSkipped, Ctx, case
from shared.tools.conformance.cases_native import NATIVE_ONLY, _ping, _worker_with_caps
from shared.tools.conformance.profiles import hexabbr
from shared.tools.conformance.wire import Conn, PeerClosed, WaitTimeout

CAPS = ["welcome", "barrier", "unframed"]
#: Foreign deliveries (other traffic on the broker) skipped at most.
MAX_SKIPPED = 1000


def _unframed_worker(ctx: Ctx, wid: int) -> Conn:
    if not ctx.cfg.extensions:
        raise CaseSkipped("told --no-extensions")
    conn, msg = _worker_with_caps(ctx, wid, CAPS)
    if "unframed" not in (msg.get("caps") or []):
        raise CaseSkipped(f"the welcome does not grant 'unframed' (caps {msg.get('caps')!r})")
    return conn


def _next_object(ctx: Ctx, conn: Conn, who: str, waiting_for: str) -> bytes:
    try:
        return conn.read_object(ctx.deadline, waiting_for)
    except (PeerClosed, WaitTimeout) as exc:
        raise CaseFailed(f"{who}: expected {waiting_for} as a bare MessagePack object: {exc}") from exc
    except (ValueError, msgpack.UnpackException) as exc:
        raise CaseFailed(f"{who}: the bytes {hexabbr(bytes(conn.buf), 48)} are not a "
                         f"MessagePack object ({exc}): deliveries must come unframed") from exc


def _expect_objects(ctx: Ctx, conn: Conn, expected: list[bytes], who: str) -> None:
    """This case's next deliveries on ``conn``, read as bare objects, must be exactly
    ``expected`` (the published event bytes, unchanged)."""
    got: list[bytes] = []
    for _ in range(MAX_SKIPPED + len(expected)):
        obj = _next_object(ctx, conn, who, f"delivery {ctx.describe(expected[len(got):][:1])}")
        if ctx.ours(obj):
            got.append(obj)
            if len(got) == len(expected):
                break
    if got != expected:
        raise CaseFailed(f"{who}: expected bare deliveries {ctx.describe(expected)}, got "
                         f"{ctx.describe(got)}")


@case("unframed.granted", "deliveries (and pongs) to a worker granted 'unframed' come as bare "
      "MessagePack objects, the event bytes unchanged; its publishes and everyone else's "
      "deliveries stay framed", native_only=NATIVE_ONLY)
def granted(ctx: Ctx) -> None:
    pub_id, bare_id = ctx.id0, ctx.id0 + 1
    (pub,) = ctx.join([pub_id])
    bare = _unframed_worker(ctx, bare_id)
    # Registered once a publish of its own is delivered back (unframed) and to the plain
    # worker (framed).
    probe = ctx.event(bare_id, "probe")
    bare.send(ctx.publish_frame({}, probe))
    _expect_objects(ctx, bare, [probe], f"worker {bare_id} (unframed, its own probe)")
    ctx.expect(pub, [probe], f"worker {pub_id} (plain hello, the unframed worker's publish)")
    events = [ctx.event(pub_id, "small"), ctx.event(pub_id, "large", "x" * 3000),
              ctx.event(pub_id, "data", {"k": [1, 2.5, None, True], "b": b"\x00\xff"})]
    pub.send(b"".join(ctx.publish_frame({}, e) for e in events))
    _expect_objects(ctx, bare, events, f"worker {bare_id} (unframed)")
    ctx.expect(pub, events, f"worker {pub_id} (plain hello)")
    # The pong is a bare object too.
    bare.send(_ping(ctx, 7))
    expected = ctx.profile.encode({"pong": 7})
    who = f"worker {bare_id} (unframed, after ping 7)"
    for _ in range(MAX_SKIPPED):
        obj = _next_object(ctx, bare, who, "pong 7")
        if obj == expected:
            return
        if not ctx.ours(obj) and b"source" not in obj:
            raise CaseFailed(f"{who}: expected the bare pong {hexabbr(expected)}, got another "
                             f"control object {hexabbr(obj, 48)}")
    raise CaseFailed(f"{who}: no pong within {MAX_SKIPPED} deliveries")


@case("unframed.needs-welcome", "'unframed' asked without 'welcome' is not granted: "
      "deliveries stay framed", native_only=NATIVE_ONLY)
def needs_welcome(ctx: Ctx) -> None:
    if not ctx.cfg.extensions:
        raise CaseSkipped("told --no-extensions")
    wid = ctx.id0
    conn = ctx.connect()
    conn.label = f"worker {wid}"
    if ctx.cfg.transport == "http":
        ctx.upgrade(conn)
    conn.send(ctx.profile.frame(ctx.profile.encode({"id": wid, "pid": 1, "caps": ["unframed"]})))
    # No welcome was asked, so none comes: the first thing read is the worker's own
    # publish, framed (ctx.roundtrip reads frames).
    ctx.roundtrip(conn, wid, f"worker {wid} (caps ['unframed'] without 'welcome')")
