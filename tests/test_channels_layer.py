"""The channel layer specification against a real broker, in-process, on both backends.

Several layer instances in one process stand for several workers: each joins the bus with
its own worker id (embedded: one of them hosts the broker), exactly as separate processes
would. Channels itself runs consumers on asyncio only; the layer is anyio code, so these run
on trio too. tests/test_channels_django.py runs it inside real Django under uvicorn.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from channels.exceptions import ChannelFull

from shared.broker import Broker
from shared.integrations.channels import ChannelLayerUnavailable, WorkerbusChannelLayer
from tests.helpers import wait_until

pytestmark = pytest.mark.anyio

#: Bounds a negative check ("nothing more arrives"); also the bound of every wait.
QUIET = 0.3


@asynccontextmanager
async def layers(address: str, n: int, **config: Any) -> AsyncIterator[list[WorkerbusChannelLayer]]:
    made = [WorkerbusChannelLayer(address, **config) for _ in range(n)]
    try:
        # new_channel() starts each session; the first one elected hosts the broker.
        for layer in made:
            await layer.new_channel()
        yield made
    finally:
        for layer in made:
            await layer.close()


async def recv(layer: WorkerbusChannelLayer, channel: str) -> dict[str, Any]:
    with anyio.fail_after(5):
        return await layer.receive(channel)


async def nothing_more(layer: WorkerbusChannelLayer, channel: str) -> None:
    with anyio.move_on_after(QUIET):
        extra = await layer.receive(channel)
        raise AssertionError(f"unexpected message on {channel}: {extra}")


async def test_send_reaches_the_owner_in_order_locally_and_across_workers(address: str) -> None:
    async with layers(address, 2) as (a, b):
        assert {a.worker_id, b.worker_id} == {0, 1}
        ca, cb = await a.new_channel(), await b.new_channel("chat.")
        assert ca.startswith(f"specific.wb{a.worker_id}.") and "!" in ca
        assert cb.startswith(f"chat.wb{b.worker_id}.")
        for i in range(50):
            await a.send(ca, {"type": "m", "i": i})  # local
            await a.send(cb, {"type": "m", "i": i, "b": b"\x00raw"})  # through the broker
        assert [(await recv(a, ca))["i"] for _ in range(50)] == list(range(50))
        got = [await recv(b, cb) for _ in range(50)]
        assert [m["i"] for m in got] == list(range(50))
        assert got[0] == {"type": "m", "i": 0, "b": b"\x00raw"}
        await nothing_more(b, cb)
        # receive() only on channels of this process
        with pytest.raises(ValueError, match="not a channel of this process"):
            await a.receive(cb)


async def test_group_send_reaches_every_member_exactly_once(address: str) -> None:
    async with layers(address, 3) as (a, b, c):
        a1, a2, b1, c1 = (await a.new_channel(), await a.new_channel(),
                          await b.new_channel(), await c.new_channel())
        await a.group_add("room", a1)
        await a.group_add("room", a2)
        await a.group_add("room", b1)  # a channel of another worker: its owner keeps it
        await c.group_add("room", c1)
        await c.group_add("other", c1)
        owners = {a1: a, a2: a, b1: b, c1: c}
        # Adds of another worker's channel travel as messages: b knows of b1's membership
        # once a's next message to b1 (same publisher, same order) has arrived.
        await a.send(b1, {"type": "marker"})
        assert (await recv(b, b1))["type"] == "marker"
        for sender in (a, b, c):
            await sender.group_send("room", {"type": "hi", "from": sender.worker_id})
            for channel, owner in owners.items():
                assert await recv(owner, channel) == {"type": "hi", "from": sender.worker_id}
        for channel, owner in owners.items():
            await nothing_more(owner, channel)
        assert sum(x.statistics().delivered for x in (a, b, c)) == 13
        assert b.statistics().group_sent == 1


async def test_group_send_copies_the_message_for_each_local_member(address: str) -> None:
    async with layers(address, 1) as (a,):
        x, y = await a.new_channel(), await a.new_channel()
        await a.group_add("g", x)
        await a.group_add("g", y)
        msg = {"type": "t", "items": [1]}
        await a.group_send("g", msg)
        got_x, got_y = await recv(a, x), await recv(a, y)
        got_x["items"].append(2)
        assert got_y == {"type": "t", "items": [1]} and msg == {"type": "t", "items": [1]}


async def test_group_discard_locally_and_remotely(address: str) -> None:
    async with layers(address, 2) as (a, b):
        a1, b1 = await a.new_channel(), await b.new_channel()
        for ch in (a1, b1):
            await a.group_add("g", ch)
        await a.group_discard("g", a1)
        await a.group_discard("g", b1)  # published to b's worker, ahead of the group_send
        await a.group_discard("never-there", a1)  # no error
        await a.group_send("g", {"type": "nobody"})
        await a.send(a1, {"type": "marker"})
        await a.send(b1, {"type": "marker"})
        assert (await recv(a, a1))["type"] == "marker"
        assert (await recv(b, b1))["type"] == "marker"


async def test_capacity_raises_channel_full_locally_and_drops_counted_remotely(address: str) -> None:
    async with layers(address, 2, capacity=3, channel_capacity={"big.*": 5}) as (a, b):
        ch = await a.new_channel()
        for i in range(3):
            await a.send(ch, {"type": "m", "i": i})
        with pytest.raises(ChannelFull):
            await a.send(ch, {"type": "m", "i": 3})
        assert a.statistics().full == 1
        big = await a.new_channel("big")
        for i in range(5):
            await a.send(big, {"type": "m", "i": i})
        with pytest.raises(ChannelFull):
            await a.send(big, {"type": "m"})
        # From another worker the sender cannot be told: the owner drops and counts.
        remote = await a.new_channel()
        marker = await a.new_channel()
        for i in range(5):
            await b.send(remote, {"type": "m", "i": i})
        await b.send(marker, {"type": "marker"})
        assert (await recv(a, marker))["type"] == "marker"  # same publisher: after the 5
        assert a.statistics().dropped_full == 2
        assert [(await recv(a, remote))["i"] for _ in range(3)] == [0, 1, 2]
        # A full member does not stop a group_send to the others
        other = await a.new_channel()
        await a.group_add("g", ch)
        await a.group_add("g", other)
        await a.group_send("g", {"type": "g"})
        assert (await recv(a, other))["type"] == "g"
        assert a.statistics().dropped_full == 3


async def test_expiry_drops_old_messages_and_their_channel_leaves_its_groups(address: str) -> None:
    async with layers(address, 1, expiry=0.2) as (a,):
        ch, keep = await a.new_channel(), await a.new_channel()
        await a.group_add("g", ch)
        await a.group_add("g", keep)
        await a.send(ch, {"type": "old"})
        await anyio.sleep(0.3)  # time must pass for a message to expire
        await a.send(ch, {"type": "new"})
        assert (await recv(a, ch))["type"] == "new"
        assert a.statistics().expired == 1
        await a.group_send("g", {"type": "g"})  # ch left the group when its message expired
        assert (await recv(a, keep))["type"] == "g"
        await nothing_more(a, ch)


async def test_group_expiry_ends_memberships(address: str) -> None:
    async with layers(address, 1, group_expiry=0.2) as (a,):
        ch = await a.new_channel()
        await a.group_add("g", ch)
        await anyio.sleep(0.3)  # the membership must grow old
        await a.group_send("g", {"type": "late"})
        await a.send(ch, {"type": "marker"})
        assert (await recv(a, ch))["type"] == "marker"


async def test_names_and_messages_are_validated(address: str) -> None:
    async with layers(address, 1) as (a,):
        ch = await a.new_channel()
        for bad in ("has space", "x" * 100, "", "uni\u00e9", 7):
            with pytest.raises(TypeError):
                await a.send(bad, {"type": "m"})  # type: ignore[arg-type]
        for bad_group in ("has!bang", "x" * 100, "sp ace"):
            with pytest.raises(TypeError):
                await a.group_add(bad_group, ch)
            with pytest.raises(TypeError):
                await a.group_send(bad_group, {"type": "m"})
        with pytest.raises(TypeError, match="must be a dict"):
            await a.send(ch, ["not", "a", "dict"])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="reserved"):
            await a.send(ch, {"type": "m", "__asgi_channel__": "x"})
        with pytest.raises(ValueError, match="not made by a WorkerbusChannelLayer"):
            await a.send("specific.inmemory!abc", {"type": "m"})
        assert WorkerbusChannelLayer.extensions == ["groups", "flush"]
        with pytest.raises(ValueError, match="CONFIG 'address'"):
            WorkerbusChannelLayer(None)


async def test_flush_empties_channels_and_groups_on_every_worker(address: str) -> None:
    async with layers(address, 2) as (a, b):
        a1, b1 = await a.new_channel(), await b.new_channel()
        await a.group_add("g", a1)
        await b.group_add("g", b1)
        await a.send(a1, {"type": "queued"})
        await a.send(b1, {"type": "queued"})
        await a.flush()  # after the queued send to b1, on the same connection
        await a.send(b1, {"type": "after"})
        assert (await recv(b, b1))["type"] == "after"
        await a.group_send("g", {"type": "g"})
        await b.group_send("g", {"type": "g"})
        await nothing_more(a, a1)
        await nothing_more(b, b1)


async def test_messages_for_a_previous_process_under_the_same_id_are_counted_stale(address: str) -> None:
    async with layers(address, 2) as (a, b):
        ch = await a.new_channel()
        stale = ch.replace(ch.split("!")[0].rsplit(".", 1)[1], "00000000")
        await b.send(stale, {"type": "m"})
        await b.group_add("g", stale)
        await a.send(stale, {"type": "m"})
        await b.send(ch, {"type": "marker"})
        assert (await recv(a, ch))["type"] == "marker"
        assert a.statistics().stale == 3


async def test_a_normal_channel_is_read_where_it_is_received(address: str) -> None:
    async with layers(address, 2) as (a, b):
        async with anyio.create_task_group() as tg:
            got: list[dict[str, Any]] = []

            async def reader() -> None:
                got.append(await recv(a, "jobs"))

            tg.start_soon(reader)
            # The reader is registered once it waits; poll for that, bounded.
            await wait_until(lambda: "jobs" in a._session.channels, 10)  # type: ignore[union-attr]
            await b.send("jobs", {"type": "job", "n": 1})
        assert got == [{"type": "job", "n": 1}]


async def test_sends_from_another_event_loop_use_a_one_shot_connection(
    address: str, anyio_backend: str
) -> None:
    async with layers(address, 1) as (a,):
        ch = await a.new_channel()
        await a.group_add("g", ch)
        # What asgiref's async_to_sync does from a sync view or a management command:
        # the call runs in a fresh event loop of another thread.
        await anyio.to_thread.run_sync(
            lambda: anyio.run(a.group_send, "g", {"type": "from-sync"}, backend=anyio_backend)
        )
        assert (await recv(a, ch))["type"] == "from-sync"
        await anyio.to_thread.run_sync(
            lambda: anyio.run(a.send, ch, {"type": "direct"}, backend=anyio_backend)
        )
        assert (await recv(a, ch))["type"] == "direct"
        assert a.statistics().one_shot == 2

        def receive_elsewhere() -> None:
            async def go() -> None:
                await a.receive(ch)

            anyio.run(go, backend=anyio_backend)

        with pytest.raises(RuntimeError, match="another event loop"):
            await anyio.to_thread.run_sync(receive_elsewhere)


async def test_a_one_shot_send_without_a_broker_fails_clearly(address: str) -> None:
    layer = WorkerbusChannelLayer(address, connect_timeout=0.3)
    start = time.monotonic()
    with pytest.raises(ChannelLayerUnavailable, match="is the server running"):
        await layer.group_send("g", {"type": "m"})
    assert time.monotonic() - start < 5


async def test_external_broker_mode(address: str, transport: str) -> None:
    broker = Broker(transport=transport)
    async with anyio.create_task_group() as tg:
        await tg.start(broker.serve, address)
        config: dict[str, Any] = {"embedded": False, "transport": transport}
        a = WorkerbusChannelLayer(address, worker_id=11, **config)
        b = WorkerbusChannelLayer(address, worker_id=12, **config)
        try:
            ca, cb = await a.new_channel(), await b.new_channel()
            assert ".wb11." in ca and ".wb12." in cb
            await b.group_add("g", ca)
            await b.group_add("g", cb)
            await b.send(ca, {"type": "marker"})  # after the add, from the same publisher
            assert (await recv(a, ca))["type"] == "marker"
            await a.group_send("g", {"type": "x"})
            assert await recv(a, ca) == {"type": "x"}
            assert await recv(b, cb) == {"type": "x"}
        finally:
            await a.close()
            await b.close()
        tg.cancel_scope.cancel()


async def test_a_cancelled_receive_loses_nothing_and_does_not_pin_its_channel(address: str) -> None:
    async with layers(address, 1) as (a,):
        ch = await a.new_channel()
        with anyio.move_on_after(0.05):
            await a.receive(ch)  # a consumer that went away while waiting
        entry = a._session.channels[ch]  # type: ignore[union-attr]
        assert entry.waiting == 0 and entry.waiter is None  # the sweep may now forget it
        await a.send(ch, {"type": "kept"})
        assert (await recv(a, ch))["type"] == "kept"
