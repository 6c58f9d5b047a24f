"""The ``filter`` capability (docs/protocol.md §8; issue #14): workers get only what they
handle, and handlers see exactly what they would without it.

Router and message units, then the bus end to end: real broker, real Unix sockets, both
transports, both backends. The property test drives one random sequence of subscribe /
unsubscribe / publish through a filtered and an unfiltered bus and compares what every
handler saw, step by step (flush() barriers and marker events between steps).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, cast

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.broker import Broker
from shared.client import Client
from shared.errors import RemoteProtocolError
from shared.frame import encode_frame
from shared.messages import (
    ALL,
    MAX_SUB_NAME_LEN,
    MAX_SUB_PATTERNS,
    OTHERS,
    RunKeys,
    decode_publish,
    decode_publish_batch,
    decode_sub,
    encode_event,
    encode_hello,
    encode_publish,
    encode_publish_keyed,
    encode_sub,
    parse_target,
)
from shared.profile import NATIVE
from shared.router import Router, matches
from shared.transport import get_transport, parse_address

from .helpers import Recorder, wait_until

# --- messages ------------------------------------------------------------------------------


def test_sub_round_trip_and_limits() -> None:
    pats = frozenset({("*", "*"), ("a", "*"), ("a", "x")})
    assert decode_sub(NATIVE, encode_sub(NATIVE, pats)) == pats
    assert decode_sub(NATIVE, encode_sub(NATIVE, frozenset())) == frozenset()
    bad: list[object] = [
        {"sub": [["a"]]},
        {"sub": [["a", ""]]},
        {"sub": [["*", "x"]]},
        {"sub": [["a", 1]]},
        {"sub": "a"},
        {"sub": [], "x": 1},
        {"sub": [["a", "b"]] * (MAX_SUB_PATTERNS + 1)},
        {"sub": [["a" * (MAX_SUB_NAME_LEN + 1), "b"]]},
    ]
    for msg in bad:
        with pytest.raises(RemoteProtocolError):
            decode_sub(NATIVE, NATIVE.codec.dumps(msg))
    with pytest.raises(ValueError):
        encode_sub(NATIVE, frozenset((str(i), "e") for i in range(MAX_SUB_PATTERNS + 1)))


@pytest.mark.parametrize("target", ["all", "others", "worker:3", "unique:k"])
@pytest.mark.parametrize("size", [3, 300])
@pytest.mark.parametrize("names", [("s", "e"), ("s" * 40, "é" * 100), ("s" * 300, "e")])
def test_keyed_publish_recognised_as_the_general_decoder_reads_it(target: str, size: int, names: tuple[str, str]) -> None:
    t = parse_target(target)
    inner = encode_event(NATIVE, names[0], names[1], b"x" * size, 1)
    keyed = encode_publish_keyed(NATIVE, t, inner, *names)
    # the same map through the general codec: the fast path and the decoder agree
    plain = cast("dict[str, Any]", NATIVE.codec.loads(encode_publish(NATIVE, t, inner)))
    general = NATIVE.codec.dumps({"spec": plain["spec"], "data": inner, "src": names[0], "ev": names[1]})
    for payload in (keyed, general):
        keys: list[RunKeys | None] = []
        runs, error = decode_publish_batch(NATIVE, [payload, encode_publish(NATIVE, t, inner)], keys)
        assert error is None
        flat = [(target, frame, None if rk is None else rk.key_of(i))
                for (target, run), rk in zip(runs, keys, strict=True) for i, frame in enumerate(run)]  # fmt: skip
        assert flat == [(t, encode_frame(inner), names), (t, encode_frame(inner), None)]
        if t is ALL or t is OTHERS:  # one run: src/ev changing does not end one
            assert keys == [RunKeys([names, None], [0, 1])]
        # without the grant the keys are a protocol error, as before the extension
        runs, error = decode_publish_batch(NATIVE, [payload])
        assert runs == [] and error is not None and "unknown keys" in str(error)
        with pytest.raises(RemoteProtocolError):
            decode_publish(NATIVE, payload)


def test_keyed_publish_with_bad_names_is_refused() -> None:
    inner = encode_event(NATIVE, "s", "e", None, 1)
    for src, ev in ((1, "e"), ("", "e"), ("s", None)):
        payload = NATIVE.codec.dumps({"spec": {}, "data": inner, "src": src, "ev": ev})
        _, error = decode_publish_batch(NATIVE, [payload], [])
        assert error is not None


# --- router --------------------------------------------------------------------------------


def test_matches_levels_and_bus_events() -> None:
    assert matches(None, "a", "x")
    assert matches(frozenset({("*", "*")}), "a", "x")
    assert matches(frozenset({("a", "*")}), "a", "x")
    assert not matches(frozenset({("a", "*")}), "b", "x")
    assert matches(frozenset({("a", "x")}), "a", "x")
    assert not matches(frozenset({("a", "x")}), "a", "y")
    assert matches(frozenset(), "workerbus", "joined")


def _identity(r: Router) -> None:
    s = r.statistics()
    assert s.routed == s.sent + s.dropped + s.queued + s.in_flight
    for q in s.queues:
        assert q.routed == q.sent + q.dropped + q.depth + q.in_flight


def test_router_skips_and_counts_filtered_queues() -> None:
    r = Router(max_queue_len=5)
    qs = [r.attach(i) for i in range(3)]
    r.set_filter(qs[0], frozenset({("a", "*")}))
    r.set_filter(qs[1], frozenset())
    assert r.route_many(9, ALL, [b"1", b"2"], ("a", "x")) == 4  # 0 and 2
    assert r.route(9, ALL, b"3", ("b", "x")) == 1  # 2 only
    assert r.route(9, ALL, b"4") == 3  # no key: everyone
    assert r.route(9, ALL, b"5", ("workerbus", "joined")) == 3
    assert r.route(2, OTHERS, b"6", ("a", "y")) == 1  # 0 only
    assert list(qs[0].frames) == [b"1", b"2", b"4", b"5", b"6"]
    assert list(qs[1].frames) == [b"4", b"5"]
    s = r.statistics()
    assert s.filtered == 1 * 2 + 2 * 1 + 1  # queues skipped, per frame: not drops
    assert s.dropped == 0
    _identity(r)
    # the cache follows changes of filters and of the set of queues
    r.set_filter(qs[1], frozenset({("a", "x")}))
    assert r.route(9, ALL, b"7", ("a", "x")) == 1  # 1 takes it; 0 and 2 are full (drops)
    assert r.statistics().dropped == 2
    q3 = r.attach(3)
    assert r.route(9, ALL, b"8", ("a", "x")) == 2 and list(q3.frames) == [b"8"]
    # a departing worker's filter goes with its connection
    r.detach(qs[1])
    assert qs[1].filter is None
    assert r.route(9, ALL, b"9", ("c", "z")) == 2  # 1 (no filter now) and 3; 0 filtered
    assert list(qs[1].frames)[-1] == b"9"
    _identity(r)


def test_router_worker_and_unique_targets_respect_filters() -> None:
    r = Router()
    qs = [r.attach(i) for i in range(3)]
    for q in qs:
        r.set_filter(q, frozenset())
    r.set_filter(qs[2], frozenset({("a", "*")}))
    assert r.route(0, parse_target("worker:1"), b"w", ("a", "x")) == 0
    assert qs[1].filtered == 1 and qs[1].dropped == 0
    assert r.route(0, parse_target("worker:1"), b"w", ("workerbus", "x")) == 1
    for i in range(20):
        assert r.route(0, parse_target(f"unique:{i}"), b"u", ("a", "x")) == 1
    assert len(qs[2].frames) == 20
    assert r.route(0, parse_target("unique:none"), b"u", ("b", "x")) == 0
    assert r.statistics().unroutable == 1
    _identity(r)


# --- end to end ----------------------------------------------------------------------------

pytestmark_anyio = pytest.mark.anyio


@asynccontextmanager
async def bus(address: str, transport: str, ids: list[int], **kw: Any) -> AsyncIterator[tuple[Broker, list[Client]]]:
    b = Broker(transport=transport)
    async with anyio.create_task_group() as tg, AsyncExitStack() as stack:
        await tg.start(b.serve, address)
        cs = [await stack.enter_async_context(Client(address, transport=transport, worker_id=i, **kw)) for i in ids]
        with anyio.fail_after(5):
            for c in cs:
                await c.wait_ready()
        yield b, cs
        await stack.aclose()
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_welcome_grants_filter_and_plain_clients_get_everything(address: str, transport: str) -> None:
    async with bus(address, transport, [0, 1]) as (b, (pub, sub)):
        assert pub.welcome is not None and "filter" in pub.welcome.caps
    async with bus(address, transport, [0, 1], filtered=False) as (b, (pub, sub)):
        assert pub.welcome is not None and "filter" not in pub.welcome.caps
        seen = Recorder()
        sub.subscribe("a", "x", seen)
        for i in range(5):
            await pub.publish("b", "y", i)
        await pub.publish("a", "x", "mine")
        await seen.wait_for(1)
        await wait_until(lambda: sub.statistics().delivered >= 6)
        assert b.statistics().router.filtered == 0


@pytest.mark.anyio
async def test_a_subscribed_worker_gets_only_what_it_handles(address: str, transport: str) -> None:
    async with bus(address, transport, [0, 1, 2]) as (b, (pub, only_a, quiet)):
        got = Recorder()
        only_a.subscribe("a", "*", got)
        # The first event nobody handles makes each worker narrow its filter.
        await pub.publish("b", "warm-up")
        await wait_until(lambda: b.statistics().router.queues[1].filtered + 0 >= 0 and only_a._sub_sent is not None
                         and quiet._sub_sent is not None)
        await only_a.flush()
        await quiet.flush()
        before = only_a.statistics().delivered
        for i in range(50):
            await pub.publish("b" if i % 2 else "a", "x", i)
        await pub.publish("a", "end")
        await got.wait_for(26)
        await pub.flush()
        assert [e[2] for e in got.events[:25]] == list(range(0, 50, 2))
        s = b.statistics().router
        by_id = {q.worker_id: q for q in s.queues}
        assert by_id[1].filtered == 25  # the "b" events after the narrowing
        assert by_id[2].filtered == 51  # a publish-only worker: nothing but the bus's own
        assert only_a.statistics().delivered - before == 26
        assert s.routed == s.sent + s.dropped + s.queued + s.in_flight
        # a later subscribe widens the filter; flush() says the broker has it
        more = Recorder()
        quiet.subscribe("b", "x", more)
        await quiet.flush()
        await pub.publish("b", "x", "late")
        assert (await more.wait_for(1))[0][2] == "late"


@pytest.mark.anyio
async def test_keyed_publishes_with_cluster_scope_are_filtered_too(address: str, transport: str) -> None:
    # The two native extensions together: the spec carries the scope, the envelope the
    # keys (a broker without a bridge is a one-node cluster, docs/cluster.md).
    async with bus(address, transport, [0, 1]) as (b, (pub, sub)):
        assert pub.welcome is not None and {"filter", "cluster"} <= pub.welcome.caps
        got = Recorder()
        sub.subscribe("cache", "*", got)
        await pub.publish("other", "warm-up", scope="cluster")  # makes the subscriber narrow
        await wait_until(lambda: sub._sub_sent is not None)
        await sub.flush()
        await pub.publish("other", "x", 1, scope="cluster")
        await pub.publish("cache", "inv", 2, scope="cluster")
        await pub.publish("cache", "inv", 3, "others", scope="cluster")
        await pub.publish("cache", "inv", 4, "unique:k", scope="cluster")
        events = await got.wait_for(3)
        await pub.flush()
        assert [e[2] for e in events] == [2, 3, 4]
        by_id = {q.worker_id: q for q in b.statistics().router.queues}
        assert by_id[1].filtered >= 1  # "other/x" never reached the subscriber


async def _closed_after(address: str, transport: str, caps: tuple[str, ...], payload: bytes) -> None:
    # A raw worker that says hello, sends ``payload`` and must then see the broker close.
    stream, _ = await get_transport(transport).connect(parse_address(address))
    await stream.send(encode_frame(encode_hello(NATIVE, 7, os.getpid(), caps)))
    await stream.send(encode_frame(payload))
    with anyio.fail_after(5):
        try:
            for _ in range(1000):
                await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            pass
        else:
            raise AssertionError("the broker did not close the connection")
    await stream.aclose()


@pytest.mark.anyio
async def test_bad_sub_closes_only_that_connection(address: str, transport: str) -> None:
    async with bus(address, transport, [0]) as (b, (c,)):
        caps = ("welcome", "filter")
        for bad in ({"sub": [["*", "x"]]}, {"sub": [["a", "b"]] * (MAX_SUB_PATTERNS + 1)}, {"sub": 5}):
            await _closed_after(address, transport, caps, NATIVE.codec.dumps(bad))
        # a sub without the grant is a protocol error, as any unknown map was before
        await _closed_after(address, transport, ("welcome",), encode_sub(NATIVE, frozenset()))
        assert b.statistics().protocol_errors == 4
        got = Recorder()
        c.subscribe("a", "*", got)
        await c.publish("a", "still-here")
        assert (await got.wait_for(1))[0][1] == "still-here"


# --- the property: handlers see the same events with and without the filter ------------

SOURCES = ["a", "b", "*"]
EVENTS = ["x", "y", "*"]
N = 3  # clients per bus; each may subscribe and publish

_pattern = st.sampled_from([("*", "*"), ("a", "*"), ("b", "*"), ("a", "x"), ("a", "y"), ("b", "x")])
_op = st.one_of(
    st.tuples(st.just("sub"), st.integers(0, N - 1), _pattern),
    st.tuples(st.just("unsub"), st.integers(0, N - 1), st.integers(0, 7)),
    st.tuples(
        st.just("pub"),
        st.integers(0, N - 1),
        st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(["x", "y"])),
        st.sampled_from(["all", "others", "worker:0", "worker:1", "worker:2", "worker:9"]),
    ),
)

_counter = itertools.count()


class _Side:
    """One bus of the comparison: its clients, their subscriptions, what handlers saw."""

    def __init__(self, clients: list[Client]) -> None:
        self.clients = clients
        self.subs: list[list[str]] = [[] for _ in clients]
        self.seen: list[tuple[int, int, str, str, Any]] = []
        self.markers = [0] * len(clients)
        self.handlers = 0
        for i, c in enumerate(clients):
            c.subscribe("sync", "*", self._marker(i))

    def _marker(self, i: int) -> Any:
        def handler(data: Any, event: str, source: str, wid: int | None) -> None:
            self.markers[i] = data
        return handler

    def _recorder(self, client: int, handler: int) -> Any:
        def handler_(data: Any, event: str, source: str, wid: int | None) -> None:
            if source != "workerbus":
                self.seen.append((client, handler, source, event, data))
        return handler_

    async def apply(self, op: tuple[Any, ...], step: int) -> None:
        kind, who = op[0], op[1]
        c = self.clients[who]
        if kind == "sub":
            self.handlers += 1
            self.subs[who].append(c.subscribe(*op[2], self._recorder(who, self.handlers)))
            await c.flush()  # the broker has the new set before anything else happens
        elif kind == "unsub":
            if self.subs[who]:
                c.unsubscribe(self.subs[who].pop(op[2] % len(self.subs[who])))
                await c.flush()
        else:
            await c.publish(op[2][0], op[2][1], step, target=op[3])
            await c.flush()
        # Every client has handled everything routed so far once it handled this marker.
        await c.publish("sync", "m", step)
        await c.flush()
        await wait_until(lambda: all(m == step for m in self.markers))


def _per_handler(seen: list[tuple[int, int, str, str, Any]]) -> dict[tuple[int, int], list[Any]]:
    out: dict[tuple[int, int], list[Any]] = {}
    for client, handler, *event in seen:
        out.setdefault((client, handler), []).append(event)
    return out


@pytest.mark.anyio
@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=st.lists(_op, min_size=1, max_size=25))
async def test_filtered_and_unfiltered_buses_deliver_the_same(sock_dir: str, transport: str, ops: list[tuple[Any, ...]]) -> None:
    n = next(_counter)
    a_filtered = f"unix:{os.path.join(sock_dir, f'f{n}.sock')}"
    a_plain = f"unix:{os.path.join(sock_dir, f'p{n}.sock')}"
    with anyio.fail_after(60):
        async with bus(a_filtered, transport, list(range(N))) as (bf, cf), \
                bus(a_plain, transport, list(range(N)), filtered=False) as (bp, cp):
            filtered, plain = _Side(cf), _Side(cp)
            for step, op in enumerate(ops, 1):
                await filtered.apply(op, step)
                await plain.apply(op, step)
                # per handler, in order (handlers of different clients run concurrently)
                assert _per_handler(filtered.seen) == _per_handler(plain.seen), (step, op)
            sf = bf.statistics().router
            assert sf.routed == sf.sent + sf.dropped + sf.queued + sf.in_flight
            assert sf.dropped == 0 and bp.statistics().router.filtered == 0


@pytest.mark.anyio
async def test_buffered_keyed_publishes_lose_their_keys_for_a_broker_without_filter(
    address: str, transport: str
) -> None:
    # Published keyed while a filter broker was gone; the next broker (the conformance
    # kit's reference fake, a real process) does not grant "filter": the same publishes
    # must reach it without src/ev (it would close the connection on them).
    got = Recorder()
    async with Client(address, transport=transport, worker_id=3) as c:
        c.subscribe("s", "*", got)
        b = Broker(transport=transport)
        async with anyio.create_task_group() as tg:
            await tg.start(b.serve, address)
            with anyio.fail_after(5):
                await c.wait_ready()
            assert c.welcome is not None and "filter" in c.welcome.caps
            tg.cancel_scope.cancel()
        with anyio.fail_after(5):
            while c.is_ready:  # noqa: ASYNC110 - bounded by the deadline
                await anyio.sleep(0.01)
        for i in range(3):
            c.publish_nowait("s", "while-away", i)
        path = parse_address(address)
        _remove(path)
        fake = os.path.join(os.path.dirname(__file__), "fake_brokers.py")
        async with await anyio.open_process([sys.executable, fake, path, "--transport", transport]) as proc:
            try:
                with anyio.fail_after(10):
                    await got.wait_for(3, timeout=10)
                assert c.welcome is not None and "filter" not in c.welcome.caps
                assert [e[2] for e in got.events] == [0, 1, 2]
            finally:
                proc.kill()


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
