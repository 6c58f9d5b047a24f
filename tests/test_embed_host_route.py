"""The host's broker routes its own client's writes at once (Broker.route_waiting): the
publishes of a burst made in one turn of the host's loop reach every queue during that
turn, not after it. Real brokers and clients over Unix sockets, both backends and both
transports; nothing is replaced.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from shared import broker as broker_module
from shared import client as client_module
from shared.client import Client
from shared.embed import EmbeddedClient, join
from shared.frame import encode_frame
from shared.messages import build_publish_frame, parse_target

from . import helpers
from .helpers import Recorder, queue_of, wait_until

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def two_workers(address: str, transport: str) -> AsyncIterator[tuple[EmbeddedClient, EmbeddedClient]]:
    """Two embedded workers in this process: the first to join hosts the broker."""
    async with join(address, workers=2, transport=transport) as host, \
            join(address, workers=2, transport=transport) as other:  # fmt: skip
        assert host.is_broker and not other.is_broker
        with anyio.fail_after(5):
            await host.wait_ready()
            await other.wait_ready()
        yield host, other


async def test_the_hosts_burst_is_routed_while_it_is_published(address: str, transport: str) -> None:
    n = client_module._EARLY_WRITE
    # As many pieces as the broker routes at once even if none of them is written to a
    # worker before the next (a connection written to a moment ago waits for its writer
    # task, which gets no turn here): beyond _WAITING_BACKLOG the read task takes over.
    pieces = broker_module._WAITING_BACKLOG // n
    assert pieces >= 2
    async with two_workers(address, transport) as (host, other):
        at_host, at_other = Recorder(), Recorder()
        host.subscribe("s", "*", at_host)
        other.subscribe("s", "*", at_other)
        broker = host.hosting.broker
        assert broker is not None
        with anyio.fail_after(10):
            await host.flush()
            await other.flush()
            before = (queue_of(broker, other.worker_id).routed, queue_of(broker, host.worker_id).routed)
            for i in range(pieces * n):  # one turn of the loop: the buffer has room
                await host.publish("s", "e", i)
            # Every piece the early writes put on the socket was routed to both queues
            # right there, with no turn of the loop for the broker's read task.
            routed = (queue_of(broker, other.worker_id).routed, queue_of(broker, host.worker_id).routed)
            assert (routed[0] - before[0], routed[1] - before[1]) == (pieces * n, pieces * n)
            await host.publish("s", "last", None)  # (under the early write: the writer's)
            await at_other.wait_for(pieces * n + 1)
            await at_host.wait_for(pieces * n + 1)
            await host.flush()  # the pings in those writes were answered
        expected: list[tuple[str, str, int | None, int]] = [
            ("s", "e", i, host.worker_id) for i in range(pieces * n)
        ]
        expected.append(("s", "last", None, host.worker_id))
        assert at_other.events == expected
        assert at_host.events == expected
        assert (host.lost, other.lost) == (0, 0)


async def test_a_sub_in_the_hosts_write_applies_to_the_publishes_after_it(
    address: str, transport: str
) -> None:
    # The host's client grants itself "filter": a subscription change leaves as a sub
    # frame before the next publishes, in the same write. Routed at once, the sub must
    # still apply before them, as when the read task routes the write.
    n = client_module._EARLY_WRITE
    async with two_workers(address, transport) as (host, other):
        at_host = Recorder()
        host.subscribe("a", "*", at_host)
        broker = host.hosting.broker
        assert broker is not None
        with anyio.fail_after(10):
            await host.flush()
            before = queue_of(broker, host.worker_id).routed
            host.subscribe("b", "*", at_host)
            for i in range(n):
                await host.publish("b", "e", i)
            assert queue_of(broker, host.worker_id).routed - before == n
            await at_host.wait_for(n)
        assert at_host.events == [("b", "e", i, host.worker_id) for i in range(n)]
        assert other.lost == 0


async def test_route_waiting_takes_whole_frames_and_ends_a_bad_connection_as_the_read_task(
    address: str, transport: str
) -> None:
    # Broker.route_waiting on a connection whose read task waits: a frame cut in half
    # stays in the socket for the read task (which routes it once it is whole), and a bad
    # frame is counted and ends the connection, as when the read task meets it.
    async with helpers.serving(address, transport=transport, expected_workers=2) as broker:
        async with Client(address, transport=transport, worker_id=0) as sub, \
                Client(address, transport=transport, worker_id=1) as pub:  # fmt: skip
            rec = Recorder()
            sub.subscribe("s", "*", rec)
            with anyio.fail_after(10):
                await sub.wait_ready()
                await pub.wait_ready()
                await pub.flush()
                frames: Any = pub._frames_out
                assert frames is not None
                frame = build_publish_frame(
                    pub.profile, 1, "s", "e", 7, parse_target("others"), pub.max_payload_len, pub._filtering
                )
                routed = queue_of(broker, 0).routed
                assert frames.send_nowait(frame[:5]) == 5
                broker.route_waiting(1)
                assert queue_of(broker, 0).routed == routed  # half a frame: not taken
                assert frames.send_nowait(frame[5:]) == len(frame) - 5
                await rec.wait_for(1)  # the read task routed it
                assert rec.events == [("s", "e", 7, 1)]

                await wait_until(lambda: broker._connections[1].parked)
                connects = pub.statistics().connects
                bad = encode_frame(b"\xc1not msgpack", pub.profile.header_len)
                assert frames.send_nowait(bad) == len(bad)
                broker.route_waiting(1)
                assert broker.statistics().protocol_errors == 1
                # the connection ended; the client comes back and works as before
                await wait_until(lambda: pub.statistics().connects > connects)
                await pub.wait_ready()
                await pub.publish("s", "e", 8, "others")
                await rec.wait_for(2)
            assert rec.events == [("s", "e", 7, 1), ("s", "e", 8, 1)]


async def test_a_host_that_publishes_faster_than_a_worker_reads_still_waits(
    address: str, transport: str
) -> None:
    # Routed at once, a flood would never fill the host's socket and buffer, so its
    # publish would never wait. Once a worker's writes are behind, the host's writes are
    # left to the read task again: the buffer fills and publish waits, as before.
    async with two_workers(address, transport) as (host, other):
        gate = anyio.Event()

        async def stuck(data: Any, event: str, source: str, wid: int | None) -> None:
            await gate.wait()

        other.subscribe("s", "*", stuck)
        ran = anyio.Event()
        published = 0

        async def mark() -> None:
            ran.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(mark)  # runs at the publisher's first wait
            with anyio.fail_after(20):
                await host.flush()
                while not ran.is_set():
                    await host.publish("s", "e", published, "others")
                    published += 1
                    assert published < 200_000, "the publisher never waited"
                gate.set()
                await wait_until(lambda: other.statistics().delivered >= published, 20)
        assert other.statistics().dropped_by_broker == 0
