"""The broker's timers on an injected clock: each case moves time instead of waiting for it.

A real broker on a real Unix socket, real clients or raw peers; only the clock is the
test's (``Broker(clock=...)``), and ``Broker.tick()`` runs the once-a-second upkeep at once.
Both anyio backends (conftest).
"""

from __future__ import annotations

import anyio
import pytest

from shared.broker import Broker
from shared.client import Client
from shared.frame import encode_frame
from shared.messages import encode_hello
from shared.profile import NATIVE

from .helpers import ManualClock, wait_until

pytestmark = pytest.mark.anyio


async def test_a_peer_stuck_in_a_frame_is_closed_at_the_deadline_of_the_clock(address: str) -> None:
    clock = ManualClock()
    broker = Broker(transport="stream", frame_timeout=30.0, clock=clock)
    async with anyio.create_task_group() as tg:
        await tg.start(broker.serve, address)
        # The hello and the start of a frame in one small write: the broker reads them
        # together, so the frame has begun (on the clock) once the worker is registered.
        async with await anyio.connect_unix(address[len("unix:") :]) as peer:
            await peer.send(encode_frame(encode_hello(NATIVE, 5, 1)) + (100).to_bytes(2, "big") + b"x" * 10)
            await wait_until(lambda: broker.statistics().connections == 1)
            clock.advance(29.0)
            broker.tick()
            assert broker.statistics().frame_timeouts == 0
            clock.advance(1.0)
            broker.tick()
            assert broker.statistics().frame_timeouts == 1
            with anyio.fail_after(5), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await peer.receive()  # the broker closed it
        await wait_until(lambda: broker.statistics().connections == 0)
        tg.cancel_scope.cancel()


async def test_a_departed_queue_is_muted_then_expires_on_the_clock(address: str, transport: str) -> None:
    clock = ManualClock()
    broker = Broker(transport=transport, queue_grace=600.0, broadcast_grace=60.0, clock=clock)
    async with anyio.create_task_group() as tg:
        await tg.start(broker.serve, address)
        async with Client(address, transport=transport, worker_id=7) as gone:
            await gone.wait_ready()
        await wait_until(lambda: broker.statistics().connections == 0)
        async with Client(address, transport=transport, worker_id=1) as publisher:
            await publisher.wait_ready()

            def seven() -> tuple[int, int]:  # (routed, depth) of worker 7's queue
                q = next(q for q in broker.statistics().router.queues if q.worker_id == 7)
                return q.routed, q.depth

            await publisher.publish("s", "within-grace")
            await publisher.flush()
            assert seven() == (1, 1)  # kept for its return
            clock.advance(60.0)
            broker.tick()
            assert broker.statistics().router.queues_muted == 1
            await publisher.publish("s", "after-broadcast-grace")
            await publisher.flush()
            assert seven() == (2, 1)  # counted as missed, not copied
            clock.advance(539.0)
            broker.tick()
            assert broker.statistics().router.queues_expired == 0
            clock.advance(1.0)
            broker.tick()
            stats = broker.statistics().router
            assert stats.queues_expired == 1 and 7 not in {q.worker_id for q in stats.queues}
        tg.cancel_scope.cancel()
