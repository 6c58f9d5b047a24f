"""Bad-input cases: each must close only the offending connection.

Every case first waits (bounded) for the offender to be closed, so the broker has certainly
read the bad bytes, then checks that an innocent bystander connection is still served, that
a new connection still works, and that nothing of the bad message reached anyone.
"""

from __future__ import annotations

from shared.tools.conformance.casekit import SOURCE, Ctx, case
from shared.tools.conformance.wire import Conn


def _bystander(ctx: Ctx) -> Conn:
    wid = ctx.id0 + 1
    conn = ctx.worker(wid)
    # Named as its role: a failure to write to it and a failure to read from it (which of
    # the two comes first depends on the kernel, e.g. for a broker that died) then name the
    # same connection.
    conn.label = f"bystander {wid}"
    ctx.roundtrip(conn, wid, f"bystander {wid}")
    return conn


def _after_hello(ctx: Ctx, payload: bytes, what: str) -> None:
    """A proper worker that then sends ``payload`` as a frame must be closed."""
    bystander = _bystander(ctx)
    offender = ctx.worker(ctx.id0)
    offender.send(ctx.profile.frame(payload))
    ctx.expect_closed(offender, what, payload)
    ctx.check_bystander(bystander, ctx.id0 + 1)


def _as_first_frame(ctx: Ctx, payloads: list[tuple[bytes, str]]) -> None:
    """Each payload, sent instead of the hello, must get its connection closed."""
    bystander = _bystander(ctx)
    for payload, what in payloads:
        offender = ctx.connect()
        if ctx.cfg.transport == "http":
            ctx.upgrade(offender)
        offender.send(ctx.profile.frame(payload))
        ctx.expect_closed(offender, what, payload)
    ctx.check_bystander(bystander, ctx.id0 + 1)


@case("bad.undecodable", "an undecodable payload closes that connection only")
def undecodable(ctx: Ctx) -> None:
    # 0xc1 is never used in msgpack; 0x1f is no LuaJIT string.buffer tag.
    junk = b"\xc1\xc1\xc1" if ctx.profile.native else b"\x1f\x1f\x1f"
    _after_hello(ctx, junk, "sender of an undecodable payload")


@case("bad.trailing-bytes", "a publish followed by extra bytes in the same frame is bad input "
      "(one object, no trailing bytes) and is not delivered",
      native_only="LuaJIT's buf:decode() ignores trailing bytes, so kong brokers may too")
def trailing(ctx: Ctx) -> None:
    inner = ctx.event(ctx.id0, "with-trailing-bytes")
    _after_hello(ctx, ctx.publish_payload({}, inner) + b"\xc0", "sender of trailing bytes")


@case("bad.missing-spec", "a publish without spec closes that connection, nothing delivered")
def missing_spec(ctx: Ctx) -> None:
    inner = ctx.event(ctx.id0, "no-spec")
    _after_hello(ctx, ctx.profile.encode({"data": inner}), "sender of a publish without spec")


@case("bad.spec-not-map", "a publish whose spec is a string closes that connection")
def spec_not_map(ctx: Ctx) -> None:
    inner = ctx.event(ctx.id0, "spec-is-str")
    _after_hello(ctx, ctx.publish_payload("all", inner), "sender of spec='all'")


@case("bad.data-str", "data as a msgpack str (not bin) closes that connection; no poison "
      "message reaches anyone, later publishes flow",
      native_only="a Lua string has no str/bin distinction")
def data_str(ctx: Ctx) -> None:
    text = ctx.tagged("poison")
    _after_hello(ctx, ctx.publish_payload({}, text), "sender of str data")


@case("bad.data-map", "data as a map closes that connection; no poison message, later "
      "publishes flow")
def data_map(ctx: Ctx) -> None:
    poison = {"source": SOURCE, "event": ctx.tagged("poison")}
    _after_hello(ctx, ctx.publish_payload({}, poison), "sender of map data")


@case("bad.publish-before-hello", "a publish as the first frame closes that connection")
def before_hello(ctx: Ctx) -> None:
    inner = ctx.event(ctx.id0, "before-hello")
    _as_first_frame(ctx, [(ctx.publish_payload({}, inner), "publish instead of hello")])


@case("bad.hello-schema", "hellos with a string id / without id close their connections")
def hello_schema(ctx: Ctx) -> None:
    _as_first_frame(ctx, [
        (ctx.profile.encode({"id": "one", "pid": 1}), "hello with id='one'"),
        (ctx.profile.encode({"pid": 1}), "hello without id"),
    ])


@case("bad.truncated-frame", "header announces 100 bytes, 10 arrive, then the peer closes: "
      "the broker carries on")
def truncated(ctx: Ctx) -> None:
    bystander = _bystander(ctx)
    offender = ctx.worker(ctx.id0)
    offender.send(ctx.profile.header(100) + b"\x00" * 10)
    offender.close()
    ctx.settle(bystander, ctx.id0 + 1)
    ctx.check_bystander(bystander, ctx.id0 + 1)

