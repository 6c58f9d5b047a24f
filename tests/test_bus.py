"""The bus end to end in one process: real broker, real Unix sockets, real clients.

Parametrised over both transports and both anyio backends (conftest). Scenarios follow
lua-resty-events' own test suite (research notes §5).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import ByteStream

from shared.broker import Broker
from shared.client import Client
from shared.errors import LocalProtocolError, PayloadTooLarge, PublishBufferFull, UpgradeRejected
from shared.transport import Transport, get_transport, parse_address

from .helpers import ManualClock, Recorder, wait_until

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def clients(address: str, transport: str, *ids: int, **kw: Any) -> AsyncIterator[list[Client]]:
    async with AsyncExitStack() as stack:
        out = [
            await stack.enter_async_context(Client(address, transport=transport, worker_id=i, **kw))
            for i in ids
        ]
        with anyio.fail_after(5):
            for c in out:
                await c.wait_ready()
        yield out


async def test_broadcast_reaches_every_worker_including_the_publisher(broker: Broker, address: str, transport: str) -> None:
    async with clients(address, transport, 0, 1, 2, 3) as cs:
        recs = [Recorder() for _ in cs]
        for c, r in zip(cs, recs, strict=True):
            c.subscribe("*", "*", r)
        await cs[2].publish("src", "evt", {"n": 1})
        for r in recs:
            assert await r.wait_for(1) == [("src", "evt", {"n": 1}, 2)]
        assert broker.statistics().router.deliveries == 4


async def test_current_runs_before_inflight_remote_events(broker: Broker, address: str, transport: str) -> None:
    async with clients(address, transport, 0) as (c,):
        rec = Recorder()
        c.subscribe("*", "*", rec)
        await c.publish("s", "r1")
        await c.publish("s", "r2", target="current")
        await c.publish("s", "r3")
        events = await rec.wait_for(3)
        assert [(e[1], e[3]) for e in events] == [("r2", None), ("r1", 0), ("r3", 0)]


async def test_publish_before_the_broker_exists_is_buffered(address: str, transport: str) -> None:
    rec = Recorder()
    async with Client(address, transport=transport, worker_id=0) as c:
        c.subscribe("*", "*", rec)
        await c.publish("s", "early-1")
        c.publish_nowait("s", "early-2", [1, 2])
        assert not c.is_ready
        b = Broker(transport=transport, expected_workers=1)
        async with anyio.create_task_group() as tg:
            await tg.start(b.serve, address)
            events = await rec.wait_for(2)
            assert [e[1] for e in events] == ["early-1", "early-2"]
            assert events[1][2] == [1, 2]
            tg.cancel_scope.cancel()


async def test_unique_is_handled_once_then_again_after_timeout(address: str, transport: str) -> None:
    clock = ManualClock()
    broker = Broker(transport=transport, expected_workers=4, unique_timeout=30.0, clock=clock)
    async with anyio.create_task_group() as tg:
        await tg.start(broker.serve, address)
        async with clients(address, transport, 0, 1, 2) as cs:
            await _unique_case(broker, clock, cs)
        tg.cancel_scope.cancel()


async def _unique_case(broker: Broker, clock: ManualClock, cs: list[Client]) -> None:
    recs = [Recorder() for _ in cs]
    for c, r in zip(cs, recs, strict=True):
        c.subscribe("s", "*", r)
    await cs[0].publish("s", "u1", target="unique:key")
    await cs[1].publish("s", "u2", target="unique:key")
    # Only each publisher's own events are ordered: let the broker route both first.
    await wait_until(lambda: broker.statistics().router.publishes == 2)
    await cs[2].publish("s", "marker")
    await wait_until(lambda: all(r.events and r.events[-1][1] == "marker" for r in recs))
    handled = [e[1] for r in recs for e in r.events if e[1].startswith("u")]
    assert len(handled) == 1  # u1 or u2: whichever reached the broker first
    clock.advance(29.0)  # still within the timeout: suppressed
    await cs[1].publish("s", "u3", target="unique:key")
    await cs[1].publish("s", "marker2")
    await wait_until(lambda: all(r.events and r.events[-1][1] == "marker2" for r in recs))
    assert not any(e[1] == "u3" for r in recs for e in r.events)
    clock.advance(1.0)  # the 30 s have passed, without waiting for them
    await cs[1].publish("s", "u4", target="unique:key")
    await wait_until(lambda: sum(e[1] == "u4" for r in recs for e in r.events) == 1)
    assert broker.router.unique_duplicates == 2


async def test_worker_and_others_targets(broker: Broker, address: str, transport: str) -> None:
    async with clients(address, transport, 0, 1, 2) as cs:
        recs = [Recorder() for _ in cs]
        for c, r in zip(cs, recs, strict=True):
            c.subscribe("*", "*", r)
        await cs[0].publish("s", "to-2", target=2)
        await cs[0].publish("s", "to-1", target="worker:1")
        await cs[0].publish("s", "others", target="others")
        await cs[0].publish("s", "end")
        await wait_until(lambda: all(r.events and r.events[-1][1] == "end" for r in recs))
        assert [r.names() for r in recs] == [["end"], ["to-1", "others", "end"], ["to-2", "others", "end"]]


async def test_payload_limits_are_enforced_before_sending(broker: Broker, address: str, transport: str) -> None:
    async with clients(address, transport, 0, max_payload_len=200) as (c,):
        rec = Recorder()
        c.subscribe("*", "*", rec)
        with pytest.raises(PayloadTooLarge) as info:
            await c.publish("s", "big", "x" * 200)
        assert info.value.limit == 200 and info.value.size > 200
        with pytest.raises(PayloadTooLarge):
            c.publish_nowait("s", "big", "x" * 200, target="unique:k")
        with pytest.raises(LocalProtocolError, match="MessagePack"):
            await c.publish("s", "bad", object())
        with pytest.raises(ValueError):
            await c.publish("", "evt")
        await c.publish("s", "small", "x" * 10)
        assert await rec.wait_for(1) == [("s", "small", "x" * 10, 0)]
        assert c.statistics().published == 1


async def test_default_limit_is_the_frame_maximum(broker: Broker, address: str, transport: str) -> None:
    async with clients(address, transport, 0, 1) as (c0, c1):
        rec = Recorder()
        c1.subscribe("*", "*", rec)
        assert c0.max_payload_len == 65535
        # Find the largest data that still fits, byte-exactly, and send it.
        size = 65535 - 100
        while True:
            try:
                c0._encode("s", "e", b"x" * (size + 1), c0_target())
            except PayloadTooLarge:
                break
            size += 1
        await c0.publish("s", "e", b"x" * size)
        with pytest.raises(PayloadTooLarge):
            await c0.publish("s", "e", b"x" * (size + 1))
        (event,) = await rec.wait_for(1)
        assert event[2] == b"x" * size


def c0_target() -> Any:
    from shared.messages import ALL

    return ALL


async def test_handler_errors_are_isolated_and_logged(
    broker: Broker, address: str, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with clients(address, transport, 0) as (c,):
        order: list[str] = []

        def boom(data: Any, event: str, source: str, wid: int | None) -> None:
            order.append("boom")
            raise RuntimeError("handler exploded")

        async def after(data: Any, event: str, source: str, wid: int | None) -> None:
            await anyio.lowlevel.checkpoint()
            order.append(f"after:{event}")

        c.subscribe("*", "*", boom)
        c.subscribe("s", "*", after)
        c.subscribe("s", "e", lambda *a: order.append("exact"))
        with caplog.at_level(logging.ERROR):
            await c.publish("s", "e")
            await wait_until(lambda: "exact" in order)
        assert order == ["boom", "after:e", "exact"]
        assert c.statistics().handler_errors == 1
        record = next(r for r in caplog.records if "handler failed" in r.getMessage())
        assert record.exc_info and "handler exploded" in str(record.exc_info[1])


async def test_unsubscribe_and_async_iterator(broker: Broker, address: str, transport: str) -> None:
    async with clients(address, transport, 0) as (c,):
        rec = Recorder()
        sub = c.subscribe("s", "*", rec)
        async with c.events("s") as events:
            await c.publish("s", "one", 1)
            first = await events.receive()
            assert (first.source, first.event, first.data, first.wid) == ("s", "one", 1, 0)
            assert c.unsubscribe(sub) and not c.unsubscribe(sub)
            await c.publish("s", "two", 2)
            second = await events.receive()
            assert second.event == "two"
        assert rec.names() == ["one"]


async def test_late_joiner_gets_what_was_published_before(broker: Broker, address: str, transport: str) -> None:
    # The broker fixture expects workers 0..3, so worker 3's queue exists before it connects.
    async with clients(address, transport, 0) as (c0,):
        await c0.publish("s", "before-3-joined")
        await c0.flush()
        await wait_until(lambda: broker.statistics().router.deliveries == 4)
        # Subscribe before connecting: the queued events come in the same read as the
        # welcome, so they may be dispatched before wait_ready() returns.
        c3 = Client(address, transport=transport, worker_id=3)
        rec = Recorder()
        c3.subscribe("*", "*", rec)
        async with c3:
            assert (await rec.wait_for(1))[0][1] == "before-3-joined"


async def test_reconnecting_worker_gets_what_was_published_while_away(broker: Broker, address: str, transport: str) -> None:
    async with clients(address, transport, 0) as (c0,):
        async with clients(address, transport, 9):
            pass
        await wait_until(lambda: broker.statistics().connections == 1)
        await c0.publish("s", "while-9-was-away")
        await c0.flush()
        await wait_until(lambda: broker.statistics().router.deliveries >= 5)
        c9 = Client(address, transport=transport, worker_id=9)
        rec = Recorder()
        c9.subscribe("*", "*", rec)  # (before connecting: see the test above)
        async with c9:
            assert (await rec.wait_for(1))[0][1] == "while-9-was-away"


async def test_same_id_replaces_the_old_connection(broker: Broker, address: str, transport: str) -> None:
    async with clients(address, transport, 5) as (old,):
        await wait_until(lambda: broker.statistics().connections == 1)
        path = parse_address(address)
        stream, initial = await get_transport(transport).connect(path)
        async with stream:
            from shared.frame import encode_frame
            from shared.messages import encode_hello
            from shared.profile import NATIVE

            await stream.send(encode_frame(encode_hello(NATIVE, 5, 4242)))
            await wait_until(lambda: broker._connections[5].pid == 4242)
            # The old client noticed and reconnected, replacing the raw one in turn.
            await wait_until(lambda: old.statistics().connects >= 2)
            await old.wait_ready()


async def test_bad_peer_is_dropped_and_others_carry_on(broker: Broker, address: str, transport: str) -> None:
    async with clients(address, transport, 0, 1) as (c0, c1):
        rec = Recorder()
        c1.subscribe("*", "*", rec)
        path = parse_address(address)
        # Undecodable payload; a map that is no publish; a frame cut short by EOF.
        for garbage in (b"\x00\x03\xc1\xc1\xc1", b"\x00\x01\x80", b"\x00\x64" + b"x" * 10):
            stream, _ = await get_transport(transport).connect(path)
            async with stream:
                from shared.frame import encode_frame
                from shared.messages import encode_hello
                from shared.profile import NATIVE

                await stream.send(encode_frame(encode_hello(NATIVE, 77, 1)) + garbage)
                await stream.send_eof()
                with anyio.fail_after(5):
                    with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                        while True:
                            await stream.receive()
        await c0.publish("s", "still-working")
        assert (await rec.wait_for(1))[0][1] == "still-working"
        assert broker.statistics().protocol_errors == 3


async def test_a_dead_broker_does_not_cancel_handlers_and_buffers_publishes(address: str, transport: str) -> None:
    release = anyio.Event()
    finished: list[str] = []
    rec = Recorder()

    async def slow(data: Any, event: str, source: str, wid: int | None) -> None:
        if event == "slow":
            await release.wait()
            finished.append(event)

    async with Client(address, transport=transport, worker_id=0) as c:
        c.subscribe("*", "*", slow)
        c.subscribe("*", "*", rec)
        async with anyio.create_task_group() as tg:
            await tg.start(Broker(transport=transport, expected_workers=1).serve, address)
            await c.wait_ready()
            await c.publish("s", "slow")
            await wait_until(lambda: c.statistics().delivered == 1)
            tg.cancel_scope.cancel()  # the broker dies with the handler still running
        await wait_until(lambda: not c.is_ready)
        await c.publish("s", "during-outage")
        release.set()
        await wait_until(lambda: finished == ["slow"])
        async with anyio.create_task_group() as tg:
            await tg.start(Broker(transport=transport, expected_workers=1).serve, address)
            assert [e[1] for e in await rec.wait_for(2)] == ["slow", "during-outage"]
            assert c.statistics().reconnects == 1
            tg.cancel_scope.cancel()


class FailingOnce:
    """A transport wrapper whose first connection's stream fails on the second send."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.name = inner.name
        self.failed = False

    async def connect(self, path: str) -> tuple[ByteStream, bytes]:
        stream, initial = await self.inner.connect(path)
        if self.failed:
            return stream, initial
        self.failed = True
        outer = self

        class Flaky(ByteStream):
            sends = 0

            async def send(self, item: bytes) -> None:
                Flaky.sends += 1
                if Flaky.sends == 2:
                    await stream.aclose()
                    raise anyio.BrokenResourceError("injected send failure")
                await stream.send(item)

            async def receive(self, max_bytes: int = 65536) -> bytes:
                return await stream.receive(max_bytes)

            async def send_eof(self) -> None:
                await stream.send_eof()

            async def aclose(self) -> None:
                await stream.aclose()

        del outer
        return Flaky(), initial

    async def accept(self, stream: ByteStream) -> bytes:
        return await self.inner.accept(stream)


async def test_events_are_retained_after_a_send_failure(broker: Broker, address: str, transport: str) -> None:
    flaky = FailingOnce(get_transport(transport))
    async with Client(address, transport=flaky, worker_id=0) as c:
        rec = Recorder()
        c.subscribe("*", "*", rec)
        await c.wait_ready()
        await c.publish("s", "eventdata#2")  # this write fails; the batch goes back
        events = await rec.wait_for(1)
        assert events[0][1] == "eventdata#2"
        assert c.statistics().reconnects == 1


async def test_buffer_full_while_disconnected_is_an_error_and_counted(address: str, transport: str) -> None:
    async with Client(address, transport=transport, worker_id=0, max_buffer_len=2) as c:
        await c.publish("s", "1")
        await c.publish("s", "2")
        with pytest.raises(PublishBufferFull):
            await c.publish("s", "3")
        with pytest.raises(PublishBufferFull):
            c.publish_nowait("s", "3")
        assert c.statistics().dropped == 2 and c.statistics().buffered == 2


async def test_a_refused_upgrade_carries_status_and_body(address: str, transport: str) -> None:
    if transport != "http":
        pytest.skip("HTTP only")
    path = parse_address(address)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()
    listener.setblocking(False)

    async def serve() -> None:
        await anyio.wait_readable(listener)
        conn, _ = listener.accept()
        with conn:
            conn.setblocking(True)
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\n\r\nnope\n")

    try:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(serve)
                with pytest.raises(UpgradeRejected) as info:
                    await get_transport("http").connect(path)
        assert info.value.status_code == 404 and info.value.body == b"nope\n"
    finally:
        listener.close()
        os.unlink(path)


async def test_statistics(broker: Broker, address: str, transport: str) -> None:
    async with clients(address, transport, 0, 1) as (c0, c1):
        rec = Recorder()
        c1.subscribe("*", "*", rec)
        for i in range(10):
            await c0.publish("s", "e", i)
        await rec.wait_for(10)
        await c0.flush()
        s0 = c0.statistics()
        assert (s0.published, s0.sent, s0.buffered, s0.connected) == (10, 10, 0, True)
        assert c1.statistics().delivered == 10
        bs = broker.statistics()
        assert bs.connections == 2 and bs.router.publishes == 10
        q1 = next(q for q in bs.router.queues if q.worker_id == 1)
        await wait_until(lambda: next(q for q in broker.statistics().router.queues if q.worker_id == 1).sent == 10)
        assert q1.dropped == 0


async def test_two_clients_with_one_id_are_told_and_back_off(
    broker: Broker, address: str, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="shared.client"):
        async with Client(address, transport=transport, worker_id=6), Client(address, transport=transport, worker_id=6):
            await wait_until(
                lambda: any("another process using worker id 6" in r.getMessage() for r in caplog.records),
                timeout=10,
            )
