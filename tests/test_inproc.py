"""The embedded host's own client connected in process (shared/inproc.py).

The pipe itself (a socket's behaviour: order, backpressure, half-close, close, safe
cancellation), then embedded members in one process (both backends, both transports):
the host's client is attached in process and everything a worker relies on holds for it
(order per publisher, the barrier, lifecycle events, sequence numbers, the broker's queue
limits and drop reports); a new host's client switches to in process when it takes over.
tests/test_embed_processes.py kills real host processes.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import anyio
import pytest

from shared.embed import join
from shared.inproc import PIPE_LIMIT, pipe
from shared.router import OverflowPolicy
from tests.helpers import wait_until
from tests.test_embed import hosts, members

pytestmark = pytest.mark.anyio


# --- the pipe ----------------------------------------------------------------------------


async def test_pipe_carries_bytes_in_order_both_ways() -> None:
    a, b = pipe()
    await a.send(b"one")
    await a.send(b"two")
    assert await b.receive() == b"onetwo"  # what waits is read at once, as a socket does
    await b.send(b"back")
    assert await a.receive(2) == b"ba"
    assert await a.receive() == b"ck"


async def test_pipe_wakes_a_waiting_reader() -> None:
    a, b = pipe()
    got: list[bytes] = []
    async with anyio.create_task_group() as tg:

        async def read() -> None:
            got.append(await b.receive())

        tg.start_soon(read)
        await anyio.wait_all_tasks_blocked()
        assert a.send_nowait(b"x") == 1
    assert got == [b"x"]


async def test_pipe_backpressure_like_a_socket_buffer() -> None:
    a, b = pipe()
    assert a.send_nowait(b"x" * PIPE_LIMIT) == PIPE_LIMIT
    assert a.send_nowait(b"y") == 0  # full: nothing written
    sent = anyio.Event()
    async with anyio.create_task_group() as tg:

        async def write() -> None:
            await a.send(b"z")
            sent.set()

        tg.start_soon(write)
        await anyio.wait_all_tasks_blocked()
        assert not sent.is_set()  # waits for the reader
        assert len(await b.receive(PIPE_LIMIT)) == PIPE_LIMIT
        await sent.wait()
    assert await b.receive() == b"z"


async def test_pipe_half_close_and_close() -> None:
    a, b = pipe()
    await a.send(b"last")
    await a.send_eof()
    with pytest.raises(anyio.ClosedResourceError):
        await a.send(b"more")
    assert await b.receive() == b"last"
    with pytest.raises(anyio.EndOfStream):
        await b.receive()
    await b.send(b"still")  # the other direction stays open after a half-close
    assert await a.receive() == b"still"
    await b.aclose()
    with pytest.raises(anyio.EndOfStream):
        await a.receive()
    with pytest.raises(anyio.ClosedResourceError):
        await b.receive()
    c, d = pipe()
    await d.aclose()
    with pytest.raises(anyio.BrokenResourceError):
        await c.send(b"to nobody")
    with pytest.raises(anyio.BrokenResourceError):
        c.send_nowait(b"to nobody")


async def test_pipe_close_wakes_a_blocked_writer_and_reader() -> None:
    a, b = pipe()
    a.send_nowait(b"x" * PIPE_LIMIT)
    outcome: list[str] = []
    async with anyio.create_task_group() as tg:

        async def write() -> None:
            try:
                await a.send(b"y")
            except anyio.BrokenResourceError:
                outcome.append("broken")

        async def read() -> None:
            try:
                await d.receive()
            except anyio.EndOfStream:
                outcome.append("eof")

        c, d = pipe()
        tg.start_soon(write)
        tg.start_soon(read)
        await anyio.wait_all_tasks_blocked()
        await b.aclose()
        await c.aclose()
    assert sorted(outcome) == ["broken", "eof"]


async def test_pipe_receive_cancelled_loses_nothing() -> None:
    a, b = pipe()
    with anyio.move_on_after(0.01):
        await b.receive()  # nothing comes: cancelled while waiting
    await a.send(b"kept")
    with anyio.CancelScope() as scope:
        scope.cancel()
        await b.receive()  # data waits, but the call is cancelled at its schedule point
    assert await b.receive() == b"kept"


# --- embedded members in one process ------------------------------------------------------


async def test_the_host_client_is_in_process_and_events_cross(address: str, transport: str) -> None:
    async with members(address, 3, workers=3, transport=transport, in_process=True) as ms:
        (host,) = hosts(ms)
        assert host.bus.connected_in_process
        assert not any(m.bus.connected_in_process for m in ms if m is not host)
        for m in ms:
            for i in range(50):
                m.bus.publish_nowait("t", "n", [m.bus.worker_id, i], "all")
        for m in ms:
            await m.bus.flush()  # the barrier holds in process too
        for m in ms:
            await wait_until(partial(lambda m: len(m.user_events()) == 150, m))
            got: dict[int, list[int]] = {}
            for _, _, (wid, i), sender in m.user_events():
                assert sender == wid
                got.setdefault(wid, []).append(i)
            assert got == {w: list(range(50)) for w in range(3)}  # each publisher's order
            assert m.bus.lost == 0
            assert m.lifecycle("welcome")[0]["broker"]["worker_id"] == host.bus.worker_id
        # the broker counts the in-process connection like any other
        stats = host.bus.broker_statistics()
        assert stats is not None and stats.connections == 3
        assert {w.worker_id for w in stats.workers} == {0, 1, 2}
        # the host itself appears in the others' joined events
        await wait_until(
            lambda: all(host.bus.worker_id in [d["worker_id"] for d in m.lifecycle("joined")] or m is host for m in ms)
        )


async def test_in_process_is_asked_for(address: str) -> None:
    async with members(address, 2, workers=2, transport="stream") as ms:
        (host,) = hosts(ms)
        assert not host.bus.connected_in_process
        await host.bus.publish("t", "n", 1)
        await wait_until(lambda: all(len(m.user_events()) == 1 for m in ms))


async def test_a_host_client_that_stops_reading_gets_the_broker_policy(address: str) -> None:
    # The broker's queue limit and drop counting apply to the in-process connection: a
    # host whose handlers are stuck stops reading, its queue overflows (drop_oldest), and
    # it is told how many it missed once it reads again.
    release = anyio.Event()
    handled: list[int] = []

    async def slow(data: Any, event: str, source: str, wid: int | None) -> None:
        if not release.is_set():
            await release.wait()
        handled.append(data)

    options: dict[str, Any] = {"workers": 2, "transport": "stream", "max_queue_len": 8, "in_process": True}
    broker_options: dict[str, Any] = {"max_queue_len": 64, "overflow": OverflowPolicy.DROP_OLDEST}
    async with join(address, broker_options=broker_options, **options) as host:
        async with join(address, **options) as other:
            assert host.is_broker and host.connected_in_process
            host.subscribe("flood", "*", slow)
            for i in range(4000):
                await other.publish("flood", "n", i)
            await other.flush()
            stats = host.broker_statistics()
            assert stats is not None
            await wait_until(lambda: host.statistics().dropped_by_broker > 0 or _dropped(host) > 0)
            release.set()
            await wait_until(lambda: host.statistics().dropped_by_broker > 0)
            await wait_until(lambda: bool(handled) and handled[-1] == 3999)
            dropped = host.statistics().dropped_by_broker
            assert dropped == _dropped(host)
            assert len(handled) + dropped == 4000
            assert handled == sorted(handled)  # the survivors in order
            assert host.lost == 0  # the drops were reported, so they are not "lost"


def _dropped(host: Any) -> int:
    stats = host.broker_statistics()
    return sum(q.dropped for q in stats.router.queues if q.worker_id == host.worker_id)


async def test_a_new_host_switches_its_client_to_in_process(address: str, transport: str) -> None:
    async with members(address, 3, workers=3, transport=transport, in_process=True) as ms:
        (old,) = hosts(ms)
        rest = [m for m in ms if m is not old]
        assert not any(m.bus.connected_in_process for m in rest)
        old.stop()
        await wait_until(lambda: len(hosts(rest)) == 1 and all(m.bus.is_ready for m in rest))
        (new,) = hosts(rest)
        await wait_until(lambda: new.bus.connected_in_process)
        survivor = next(m for m in rest if m is not new)
        assert not survivor.bus.connected_in_process
        for m in rest:
            for i in range(20):
                m.bus.publish_nowait("after", "n", [m.bus.worker_id, i], "others")
        await wait_until(lambda: all(len([e for e in m.user_events() if e[0] == "after"]) == 20 for m in rest))
        for m in rest:
            assert [e[2][1] for e in m.user_events() if e[0] == "after"] == list(range(20))
            assert m.bus.lost == 0
            assert m.bus.broker_moves == 1
        # the new host's own sync marker went out in process and was checked by the other
        assert survivor.bus.lost == 0


async def test_host_leaving_hands_over_in_order(address: str) -> None:
    # A host whose own client is in process publishes and leaves at once: its exit flushes
    # through the pipe, the broker drains to the other worker, which gets every event in
    # order, then the host's "left", and then hosts itself (in process in turn).
    async with members(address, 2, workers=2, transport="stream", in_process=True) as ms:
        (host,) = hosts(ms)
        (other,) = [m for m in ms if m is not host]
        for i in range(100):
            host.bus.publish_nowait("h", "n", i, "others")
        host.stop()
        await wait_until(lambda: other.bus.is_broker and other.bus.connected_in_process and other.bus.is_ready)
        assert [e[2] for e in other.user_events()] == list(range(100))
        names = [e[1] for e in other.recorder.events]
        assert names.index("left") > max(i for i, e in enumerate(other.recorder.events) if e[0] == "h")
        assert other.bus.lost == 0


async def test_a_socket_connect_that_meets_our_own_election_is_dropped(address: str) -> None:
    # The race of a takeover: the client's socket connect was under way when this worker
    # won the election, so the socket reaches our own broker. LocalFirst drops it (before
    # the hello with the stream transport) and the client connects again, in process.
    import streambus
    from shared.broker import Broker
    from shared.inproc import LocalFirst

    broker = Broker(transport=streambus.TRANSPORT)
    hosting = False
    local = LocalFirst(streambus.TRANSPORT, lambda: None, lambda: hosting)
    async with anyio.create_task_group() as tg:
        await tg.start(broker.serve, address)
        stream, _ = await local.connect_with(address[len("unix:") :], b"")  # another's broker
        assert not local.attached
        await stream.aclose()  # (closed before a hello: the broker counts it refused)
        await wait_until(lambda: broker.statistics().refused == 1)
        hosting = True
        with pytest.raises(ConnectionRefusedError):
            await local.connect_with(address[len("unix:") :], b"hello")
        await wait_until(lambda: broker.statistics().refused == 2 and broker.statistics().open_connections == 0)
        assert broker.statistics().accepted == 0  # no hello got through
        tg.cancel_scope.cancel()
