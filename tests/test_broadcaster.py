"""shared.integrations.broadcaster: the ``broadcaster`` package's API over workerbus.

In process against a real broker (both transports; the backend alone on both anyio
backends, ``Broadcast`` on asyncio, the only loop it supports). Across real uvicorn worker
processes: tests/test_ws_chat_servers.py and tests/test_ws_chat_browser.py.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from broadcaster import Broadcast, Event

from shared.broker import Broker
from shared.embed import join
from shared.integrations.broadcaster import WorkerbusBackend
from tests.helpers import wait_until

pytestmark = pytest.mark.anyio


def _client(address: str, transport: str, worker_id: int, **options: Any) -> WorkerbusBackend:
    return WorkerbusBackend(
        address, embedded=False, transport=transport, worker_id=worker_id, **options
    )


async def test_messages_reach_every_subscribed_worker_in_order(
    address: str, broker: Broker, transport: str
) -> None:
    a, b = _client(address, transport, 0), _client(address, transport, 1)
    await a.connect()
    await b.connect()
    try:
        await a.subscribe("room")
        await b.subscribe("room")
        messages: list[Any] = ["text", b"\x00bytes", {"nested": [1, 2.5, None]}, 42]
        for message in messages:
            await a.publish("room", message)
        await a.publish("elsewhere", "nobody here listens to this channel")
        await a.publish("room", "last")
        with anyio.fail_after(5):
            for backend in (a, b):  # the publisher's own worker gets its messages too
                got = [await backend.next_published() for _ in range(len(messages) + 1)]
                assert got == [Event("room", m) for m in [*messages, "last"]]
    finally:
        await b.disconnect()
        await a.disconnect()


async def test_unsubscribed_channels_are_not_delivered(
    address: str, broker: Broker, transport: str
) -> None:
    a = _client(address, transport, 0)
    await a.connect()
    try:
        await a.subscribe("one")
        await a.subscribe("two")
        await a.unsubscribe("one")
        await a.unsubscribe("never-subscribed")  # harmless, as with Redis
        await a.publish("one", "dropped by choice")
        await a.publish("two", "kept")
        with anyio.fail_after(5):
            assert await a.next_published() == Event("two", "kept")
    finally:
        await a.disconnect()


async def test_a_slow_reader_gets_backpressure_not_losses(
    address: str, broker: Broker, transport: str
) -> None:
    publisher, reader = _client(address, transport, 0), _client(address, transport, 1, max_buffer=1)
    await publisher.connect()
    await reader.connect()
    try:
        await reader.subscribe("flood")
        count = 300
        for n in range(count):
            await publisher.publish("flood", n)
        # Nobody reads yet: the buffer of 1 is full, so the rest waits in the bus.
        await wait_until(lambda: reader.bus.statistics().inbox >= count // 2)
        with anyio.fail_after(10):
            got: list[Any] = [(await reader.next_published()).message for _ in range(count)]
        assert got == list(range(count))
        assert reader.bus.statistics().dropped == 0
    finally:
        await reader.disconnect()
        await publisher.disconnect()


async def test_embedded_workers_elect_a_broker_among_themselves(address: str, transport: str) -> None:
    # The default: every backend joins the bus, one of them hosts the broker.
    first = WorkerbusBackend(address, workers=2, transport=transport)
    second = WorkerbusBackend(address, workers=2, transport=transport)
    await first.connect()
    await second.connect()
    try:
        assert sorted(b.bus.worker_id for b in (first, second)) == [0, 1]
        await first.subscribe("news")
        await second.subscribe("news")
        await second.publish("news", "from the second worker")
        with anyio.fail_after(5):
            assert await first.next_published() == Event("news", "from the second worker")
            assert await second.next_published() == Event("news", "from the second worker")
    finally:
        await second.disconnect()
        await first.disconnect()


async def test_a_given_bus_is_used_and_left_running(address: str, transport: str) -> None:
    async with join(address, workers=1, transport=transport) as bus:
        backend = WorkerbusBackend(bus=bus, source="ws")
        await backend.connect()
        got: list[Any] = []
        bus.subscribe("ws", "room", lambda data, *_: got.append(data))
        await backend.subscribe("room")
        await backend.publish("room", "hi")
        with anyio.fail_after(5):
            assert await backend.next_published() == Event("room", "hi")
        await wait_until(lambda: got == ["hi"])
        await backend.disconnect()
        assert bus.is_ready  # still the app's bus
        await bus.publish("ws", "room", "after")
        await wait_until(lambda: got == ["hi", "after"])


async def test_disconnect_frees_a_given_bus_blocked_on_a_full_buffer(
    address: str, transport: str
) -> None:
    async with join(address, workers=1, transport=transport) as bus:
        backend = WorkerbusBackend(bus=bus, max_buffer=1)
        await backend.connect()
        await backend.subscribe("room")
        for n in range(5):
            await backend.publish("room", n)
        # Nobody reads: the backend's handler waits for room, the rest waits behind it.
        await wait_until(lambda: bus.statistics().inbox >= 2)
        await backend.disconnect()
        # The app's bus is not stuck behind a backend that is gone.
        got: list[Any] = []
        bus.subscribe("app", "ping", lambda data, *_: got.append(data))
        await bus.publish("app", "ping", "still alive")
        await wait_until(lambda: got == ["still alive"])


async def test_connect_fails_clearly_without_a_broker(address: str) -> None:
    backend = WorkerbusBackend(address, embedded=False, connect_timeout=0.3)
    with pytest.raises(TimeoutError, match="no workerbus broker answered at unix:.* within 0.3s"):
        await backend.connect()
    with pytest.raises(RuntimeError, match="not connected"):
        await backend.publish("room", "x")


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="either an address or a running bus"):
        WorkerbusBackend()
    with pytest.raises(ValueError, match="source"):
        WorkerbusBackend("unix:/tmp/x.sock", source="*")
    with pytest.raises(ValueError, match="max_buffer"):
        WorkerbusBackend("unix:/tmp/x.sock", max_buffer=0)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_broadcast_api_over_workerbus(address: str, broker: Broker, transport: str) -> None:
    async with (
        Broadcast(backend=_client(address, transport, 0)) as one,
        Broadcast(backend=_client(address, transport, 1)) as two,
        one.subscribe("chat") as first,
        two.subscribe("chat") as second,
        two.subscribe("chat") as second_again,  # two subscribers in one worker
    ):
        await one.publish("chat", "hello")
        with anyio.fail_after(5):
            for subscriber in (first, second, second_again):
                assert await subscriber.get() == Event("chat", "hello")
        # "*" is a plain channel name to broadcaster (as to Redis), not a wildcard
        async with one.subscribe("*") as star:
            await two.publish("chat", "not for star")
            await two.publish("*", "for star")
            with anyio.fail_after(5):
                assert await star.get() == Event("*", "for star")
                assert await first.get() == Event("chat", "not for star")
