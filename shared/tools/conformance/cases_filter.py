"""The ``filter`` extension (docs/protocol.md §8): a worker that asked for it and sent a
``sub`` set gets only the events it handles; everyone else is served as before.

Negotiated like the other native extensions: skipped with ``--no-extensions``, and skipped
(not failed) when the welcome does not grant ``filter`` (a broker without it is correct).
"""

from __future__ import annotations

from shared.tools.conformance.casekit import CaseSkipped, Ctx, case
from shared.tools.conformance.cases_native import NATIVE_ONLY, _ping, _read_pong, _worker_with_caps
from shared.tools.conformance.wire import Conn

CAPS = ["welcome", "barrier", "filter"]
#: The bus's own source: its events pass every filter.
BUS_SOURCE = "workerbus"
#: The limits of a sub set the spec names (§8).
MAX_SUB_PATTERNS = 1024
MAX_SUB_NAME_LEN = 256


def _filter_worker(ctx: Ctx, wid: int) -> Conn:
    if not ctx.cfg.extensions:
        raise CaseSkipped("told --no-extensions")
    conn, msg = _worker_with_caps(ctx, wid, CAPS)
    if "filter" not in (msg.get("caps") or []):
        raise CaseSkipped(f"the welcome does not grant 'filter' (caps {msg.get('caps')!r})")
    return conn


def _sub(ctx: Ctx, conn: Conn, patterns: list[list[str]], n: int, who: str) -> None:
    """Send a sub set and a ping; once the pong is back the broker has the set."""
    conn.send(ctx.profile.frame(ctx.profile.encode({"sub": patterns})) + _ping(ctx, n))
    _read_pong(ctx, conn, n, who, 1000)


def _event(ctx: Ctx, wid: int, source: str, tag: str) -> bytes:
    ctx._counter += 1
    obj = {"source": source, "event": ctx.tagged(f"{tag}/{ctx._counter}"), "wid": wid}
    return ctx.label(ctx.profile.encode(obj), tag)


def _keyed(ctx: Ctx, inner: bytes) -> bytes:
    """The publish to all of ``inner`` carrying its src/ev (what a filter client sends)."""
    msg = ctx.profile.decode(inner)
    assert isinstance(msg, dict)  # (built by _event)
    payload = {"spec": {}, "data": inner, "src": msg["source"], "ev": msg["event"]}
    return ctx.profile.frame(ctx.profile.encode(payload))


@case("filter.honoured", "a sub set is honoured: matching events delivered, others not, "
      "the bus's own and unkeyed publishes always", native_only=NATIVE_ONLY)
def honoured(ctx: Ctx) -> None:
    sub_id, quiet_id, pub_id = ctx.id0, ctx.id0 + 1, ctx.id0 + 2
    wanted, other = ctx.tagged("src-a"), ctx.tagged("src-b")
    sub = _filter_worker(ctx, sub_id)
    quiet = _filter_worker(ctx, quiet_id)
    pub = _filter_worker(ctx, pub_id)
    _sub(ctx, sub, [[wanted, "*"]], 1, f"worker {sub_id}")
    _sub(ctx, quiet, [], 1, f"worker {quiet_id} (publish-only)")
    e_other = _event(ctx, pub_id, other, "b-keyed")
    e_wanted = _event(ctx, pub_id, wanted, "a-keyed")
    e_bus = _event(ctx, pub_id, BUS_SOURCE, "bus-keyed")
    e_unkeyed = _event(ctx, pub_id, other, "b-unkeyed")
    e_end = _event(ctx, pub_id, BUS_SOURCE, "bus-end")
    pub.send(_keyed(ctx, e_other) + _keyed(ctx, e_wanted) + _keyed(ctx, e_bus)
             + ctx.publish_frame({}, e_unkeyed) + _keyed(ctx, e_end))
    ctx.expect(sub, [e_wanted, e_bus, e_unkeyed, e_end], f"worker {sub_id} (sub [[src-a, *]])")
    ctx.expect(quiet, [e_bus, e_unkeyed, e_end], f"worker {quiet_id} (sub [])")
    # The publisher sent no sub: it gets everything, its own events included.
    ctx.expect(pub, [e_other, e_wanted, e_bus, e_unkeyed, e_end], f"worker {pub_id} (no sub)")
    # A new set replaces the old one.
    _sub(ctx, sub, [[other, "*"]], 2, f"worker {sub_id}")
    e_a2, e_b2 = _event(ctx, pub_id, wanted, "a-after"), _event(ctx, pub_id, other, "b-after")
    pub.send(_keyed(ctx, e_a2) + _keyed(ctx, e_b2))
    ctx.expect(sub, [e_b2], f"worker {sub_id} (sub [[src-b, *]])")


@case("filter.plain-hello", "workers that did not ask for 'filter' get every event, keyed "
      "publishes included", native_only=NATIVE_ONLY)
def plain_gets_everything(ctx: Ctx) -> None:
    pub_id, plain_id, capped_id = ctx.id0, ctx.id0 + 1, ctx.id0 + 2
    pub = _filter_worker(ctx, pub_id)
    _sub(ctx, pub, [], 1, f"worker {pub_id}")
    (plain,) = ctx.join([plain_id])
    capped, _ = _worker_with_caps(ctx, capped_id, ["welcome", "barrier"])
    ctx.roundtrip(capped, capped_id, f"worker {capped_id} (no 'filter' asked)", [plain])
    e1 = _event(ctx, pub_id, ctx.tagged("any"), "keyed")
    pub.send(_keyed(ctx, e1))
    ctx.expect(plain, [e1], f"worker {plain_id} (plain hello)")
    ctx.expect(capped, [e1], f"worker {capped_id} (no 'filter' asked)")


_BAD_SUBS: list[tuple[str, object]] = [
    ("not a list", {"sub": 5}),
    ("a pattern of one name", {"sub": [["a"]]}),
    ("a non-string name", {"sub": [["a", 1]]}),
    ("an empty name", {"sub": [["a", ""]]}),
    ("['*', event]", {"sub": [["*", "x"]]}),
    (f"{MAX_SUB_PATTERNS + 1} patterns", {"sub": [["s", str(i)] for i in range(MAX_SUB_PATTERNS + 1)]}),
    (f"a name of {MAX_SUB_NAME_LEN + 1} bytes", {"sub": [["s" * (MAX_SUB_NAME_LEN + 1), "e"]]}),
]


@case("filter.bad-sub", "a bad sub (wrong shape, over the limits) closes only that "
      "connection", native_only=NATIVE_ONLY)
def bad_sub(ctx: Ctx) -> None:
    bystander_id = ctx.id0
    (bystander,) = ctx.join([bystander_id])
    for i, (what, msg) in enumerate(_BAD_SUBS):
        wid = ctx.id0 + 1 + i % 7
        conn = _filter_worker(ctx, wid)
        sent = ctx.profile.encode(msg)
        conn.send(ctx.profile.frame(sent))
        ctx.expect_closed(conn, f"worker {wid} (sub: {what})", sent)
    ctx.check_bystander(bystander, bystander_id)
