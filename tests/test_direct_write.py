"""The broker's direct writes (shared/broker.py, "direct writes"): a routing task writes to
a connection whose writer is idle itself, and leaves what the socket does not take to the
writer task, which finishes it first. Real broker and clients over Unix sockets, both
backends and both transports; the counting wrapper only watches ``send_nowait``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from shared import client as client_module
from shared import stream as stream_module
from shared.broker import Broker
from shared.client import Client

from . import helpers
from .helpers import Recorder, queue_of, wait_until

#: ~1 KiB events: a few hundred fill a Unix socket's buffer.
PAD = "x" * 1000


@asynccontextmanager
async def serving(
    address: str, transport: str, quiet: float = 0.0, **options: Any
) -> AsyncIterator[Broker]:
    # quiet=0: write directly whenever the writer is idle, however recent its last write
    # (the default DIRECT_WRITE_QUIET depends on how fast this machine turns around); set
    # before any worker connects.
    async with helpers.serving(address, transport=transport, expected_workers=2, **options) as b:
        b.direct_write_quiet = quiet
        yield b


class Writes:
    """Counts the direct writes: whole ones and those that left a rest to the writer."""

    def __init__(self) -> None:
        self.whole = 0
        self.partial = 0


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[Writes]:
    seen = Writes()
    real = stream_module.FrameStream.send_nowait

    def counting(self: stream_module.FrameStream, data: bytes) -> int:
        written = real(self, data)
        if written == len(data):
            seen.whole += 1
        else:
            seen.partial += 1
        return written

    monkeypatch.setattr(stream_module.FrameStream, "send_nowait", counting)
    yield seen


class Gate:
    """A handler that records ("burst" events only) and waits while the gate is shut."""

    def __init__(self) -> None:
        self.open = anyio.Event()
        self.data: list[int] = []

    async def __call__(self, data: Any, event: str, source: str, wid: int | None) -> None:
        if source == "burst":
            await self.open.wait()
            self.data.append(data[0])


@asynccontextmanager
async def _sub_and_pub(address: str, transport: str) -> AsyncIterator[tuple[Client, Recorder]]:
    """Worker 0 recording every event of source "s", worker 1 to publish; both ready."""
    async with Client(address, transport=transport, worker_id=0) as sub, \
            Client(address, transport=transport, worker_id=1) as pub:  # fmt: skip
        rec = Recorder()
        sub.subscribe("s", "*", rec)
        await sub.wait_ready()
        await pub.wait_ready()
        yield pub, rec


@pytest.mark.anyio
async def test_small_bursts_to_idle_subscribers_are_written_by_the_routing_task(
    address: str, transport: str, writes: Writes
) -> None:
    async with serving(address, transport) as b:
        async with _sub_and_pub(address, transport) as (pub, rec):
            for burst in range(20):
                for i in range(5):
                    await pub.publish("s", "e", [burst, i], "others")
                await pub.flush()  # (its pong is a direct write too)
                await rec.wait_for((burst + 1) * 5)
            assert [e[2] for e in rec.events] == [[b_, i] for b_ in range(20) for i in range(5)]
            assert writes.whole >= 20
            q = queue_of(b, 0)
            assert q.routed == q.sent + q.dropped + q.depth + q.in_flight
            assert (q.dropped, q.in_flight) == (0, 0)


@pytest.mark.anyio
async def test_what_the_socket_does_not_take_is_finished_by_the_writer_in_order(
    address: str, transport: str, writes: Writes
) -> None:
    events = 3000  # ~3 MiB: far more than a socket buffer and than one batch
    async with serving(address, transport, max_queue_len=100_000) as b:
        async with Client(address, transport=transport, worker_id=0, max_queue_len=50) as sub, \
                Client(address, transport=transport, worker_id=1) as pub:  # fmt: skip
            gate = Gate()
            sub.subscribe("*", "*", gate)
            await sub.wait_ready()
            await pub.wait_ready()
            for i in range(events):
                await pub.publish("burst", "e", [i, PAD], "others")
            await pub.flush()
            await wait_until(lambda: queue_of(b, 0).depth > events // 2, 10)
            gate.open.set()
            await wait_until(lambda: len(gate.data) == events, 20)
            assert gate.data == list(range(events))
            assert writes.partial >= 1  # the first batch did not fit: the writer finished it
            q = queue_of(b, 0)
            assert (q.sent, q.dropped, q.depth, q.in_flight) == (q.routed, 0, 0, 0)


@pytest.mark.anyio
async def test_a_batch_left_to_the_writer_is_kept_when_the_connection_ends(
    address: str, transport: str, writes: Writes
) -> None:
    events = 3000
    async with serving(address, transport, max_queue_len=100_000) as b:
        async with Client(address, transport=transport, worker_id=1) as pub:
            await pub.wait_ready()
            async with Client(address, transport=transport, worker_id=0, max_queue_len=50) as sub:
                gate = Gate()
                sub.subscribe("*", "*", gate)
                await sub.wait_ready()
                for i in range(events):
                    await pub.publish("burst", "e", [i, PAD], "others")
                await pub.flush()
                await wait_until(lambda: queue_of(b, 0).depth > events // 2, 10)
                assert writes.partial >= 1
                # leaves with its handler stuck and a batch in the broker's writer
            await wait_until(lambda: not queue_of(b, 0).connected, 10)
            q = queue_of(b, 0)
            assert q.in_flight == 0 and q.dropped == 0  # put back, not lost
            async with Client(address, transport=transport, worker_id=0) as again:
                gate2 = Gate()
                gate2.open.set()
                again.subscribe("*", "*", gate2)
                await wait_until(lambda: bool(gate2.data) and gate2.data[-1] == events - 1, 20)
            # a contiguous, ordered rest: what was not confirmed written comes again (the
            # first client read some and dropped them at its close, as a closing client does)
            first = gate2.data[0]
            assert gate2.data == list(range(first, events))
            q = queue_of(b, 0)
            assert q.routed == q.sent + q.dropped + q.depth + q.in_flight
            assert q.dropped == 0


@pytest.mark.anyio
async def test_a_connection_written_to_a_moment_ago_is_left_to_its_writer(
    address: str, transport: str, writes: Writes
) -> None:
    # Everything counts as "a moment ago" here: the writer tasks do every write, batching
    # what was routed meanwhile, exactly as without direct writes.
    async with serving(address, transport, quiet=3600.0) as b:
        async with _sub_and_pub(address, transport) as (pub, rec):
            for burst in range(5):
                for i in range(5):
                    await pub.publish("s", "e", [burst, i], "others")
                await pub.flush()
                await rec.wait_for((burst + 1) * 5)
            assert [e[2] for e in rec.events] == [[b_, i] for b_ in range(5) for i in range(5)]
            assert (writes.whole, writes.partial) == (0, 0)
            q = queue_of(b, 0)
            assert (q.sent, q.dropped, q.in_flight) == (q.routed, 0, 0)


@pytest.mark.anyio
async def test_a_burst_to_many_unframed_subscribers_is_joined_once(address: str, transport: str) -> None:
    # Every connection granted "unframed" gets the same frames of a burst: their headers
    # are cut and joined once per routing pass, not once per connection, and each still
    # gets exactly its own bytes (the publisher, also subscribed, gets its pong in front
    # of the same events; a framed subscriber gets frames).
    async with serving(address, transport) as b:
        cuts = [0]
        real = b._unframe

        def counting(frame: bytes) -> Any:
            cuts[0] += 1
            return real(frame)

        b._unframe = counting  # type: ignore[assignment]
        async with Client(address, transport=transport, worker_id=0) as s0, \
                Client(address, transport=transport, worker_id=1) as s1, \
                Client(address, transport=transport, worker_id=2) as s2, \
                Client(address, transport=transport, worker_id=3, unframed=False) as framed, \
                Client(address, transport=transport, worker_id=4) as pub:  # fmt: skip
            recs = [Recorder() for _ in range(5)]
            for client, rec in zip((s0, s1, s2, framed, pub), recs, strict=True):
                client.subscribe("s", "*", rec)
                await client.wait_ready()
            bursts, size = 20, 5
            with anyio.fail_after(10):
                for burst in range(bursts):
                    cuts[0] = 0 if burst == 1 else cuts[0]  # (the first burst sets up the filters)
                    for i in range(size):
                        await pub.publish("s", "e", [burst, i], "all")
                    await pub.flush()
                    for rec in recs:
                        await rec.wait_for((burst + 1) * size)
            expected = [[b_, i] for b_ in range(bursts) for i in range(size)]
            for rec in recs:
                assert [e[2] for e in rec.events] == expected
            # one join per burst for the four unframed connections (a little slack: a write
            # left to a writer task joins on its own)
            assert (bursts - 1) * size <= cuts[0] < 2 * (bursts - 1) * size


@pytest.mark.anyio
async def test_flush_writes_itself_and_the_writer_finishes_the_rest(
    address: str, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The client's side of direct writes: flush() writes its ping and the buffered
    # publishes itself (Client._write_now); a burst bigger than the socket takes is
    # finished by the writer task, in order, before anything published after it.
    outcomes: list[bool] = []
    real = Client._write_now

    def recording(self: Client) -> bool:
        done = real(self)
        outcomes.append(done)
        return done

    monkeypatch.setattr(Client, "_write_now", recording)
    monkeypatch.setattr(client_module, "_EARLY_WRITE", 10**9)  # flush()'s writes only
    async with serving(address, transport) as b:
        async with _sub_and_pub(address, transport) as (pub, rec):
            with anyio.fail_after(20):
                await pub.flush()  # (the session's writer task may not have started yet)
                outcomes.clear()
                for i in range(5):  # small: written whole by flush()
                    await pub.publish("s", "small", i, "others")
                await pub.flush()
                for i in range(3000):  # ~3 MiB: more than the socket takes at once
                    await pub.publish("s", "big", [i, PAD], "others")
                await pub.flush()
                await pub.publish("s", "after", 0, "others")
                await pub.flush()
                await rec.wait_for(5 + 3000 + 1, timeout=20)
            # the small burst written by flush() itself, the big one's rest left to the
            # writer (the last flush may find the writer still finishing it)
            assert outcomes[:2] == [True, False] and len(outcomes) == 3
            events = [(e[1], e[2] if e[1] != "big" else e[2][0]) for e in rec.events]
            assert events == [("small", i) for i in range(5)] + [("big", i) for i in range(3000)] + [("after", 0)]
            stats = pub.statistics()
            assert (stats.published, stats.sent, stats.buffered, stats.unconfirmed) == (3006, 3006, 0, 0)
            q = queue_of(b, 0)
            assert (q.dropped, q.in_flight) == (0, 0)


@pytest.mark.anyio
async def test_a_burst_in_one_turn_leaves_in_pieces_while_it_is_published(
    address: str, transport: str
) -> None:
    # Client.publish writes what is buffered itself once _EARLY_WRITE publishes wait and
    # the writer is idle: the head of a burst published in one turn of the loop is on the
    # socket before its last publish (before the writer task could run). A burst bigger
    # than the socket takes is finished by the writer, in order.
    n = client_module._EARLY_WRITE
    async with serving(address, transport) as b:
        async with _sub_and_pub(address, transport) as (pub, rec):
            with anyio.fail_after(20):
                await pub.flush()
                sent = pub.statistics().sent
                for i in range(10 * n):  # no schedule point in here: the buffer has room
                    await pub.publish("s", "small", i, "others")
                # written whole to the socket by the publishes themselves (sent counts
                # what a write finished), with no turn of the loop for the writer task
                assert pub.statistics().sent - sent == 10 * n
                assert pub.statistics().buffered == 0
                for i in range(3000):  # ~3 MiB: more than the socket takes at once
                    await pub.publish("s", "big", [i, PAD], "others")
                # its head was taken for a write that the writer task finishes
                assert pub.statistics().buffered == 3000 - n
                await pub.publish("s", "after", 0, "others")
                await pub.flush()
                await rec.wait_for(10 * n + 3000 + 1, timeout=20)
            events = [(e[1], e[2] if e[1] != "big" else e[2][0]) for e in rec.events]
            expected = [("small", i) for i in range(10 * n)] + [("big", i) for i in range(3000)]
            assert events == expected + [("after", 0)]
            stats = pub.statistics()
            assert (stats.published, stats.sent, stats.buffered, stats.unconfirmed) == (
                10 * n + 3001, 10 * n + 3001, 0, 0
            )
            q = queue_of(b, 0)
            assert (q.dropped, q.in_flight) == (0, 0)
