"""The ``unframed`` capability (docs/protocol.md §8; issue #14): a granted client gets its
deliveries as bare MessagePack objects and reads them with one Unpacker per connection.

On the wire first (raw sockets: exactly which bytes the broker writes to a granted worker
and to a plain one), then the real client end to end (handlers see the same events with
and without it), then a broker that sends garbage. Real broker, real Unix sockets, both
transports, both backends.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import anyio
import msgpack
import pytest

from shared.broker import Broker
from shared.client import Client, ClientHooks
from shared.dispatch import Fields
from shared.errors import RemoteProtocolError
from shared.frame import encode_frame
from shared.messages import (
    ALL,
    Welcome,
    decode_welcome,
    encode_event,
    encode_hello,
    encode_ping,
    encode_pong,
    encode_publish,
    encode_welcome,
)
from shared.profile import NATIVE
from shared.router import OverflowPolicy
from shared.transport import get_transport, parse_address

from .helpers import Recorder, serve_unix, wait_until

CAPS = ("welcome", "barrier", "unframed")


async def _raw_worker(address: str, transport: str, hello: bytes) -> tuple[Any, bytearray]:
    stream, initial = await get_transport(transport).connect(parse_address(address))
    await stream.send(encode_frame(hello))
    return stream, bytearray(initial)


async def _read_frame(stream: Any, buf: bytearray) -> bytes:
    while len(buf) < 2 or len(buf) < 2 + int.from_bytes(buf[:2], "big"):
        buf += await stream.receive()
    size = int.from_bytes(buf[:2], "big")
    frame = bytes(buf[2 : 2 + size])
    del buf[: 2 + size]
    return frame


async def _read_bytes(stream: Any, buf: bytearray, count: int) -> bytes:
    while len(buf) < count:
        buf += await stream.receive()
    data = bytes(buf[:count])
    del buf[:count]
    return data


async def _read_objects(stream: Any, buf: bytearray, until: Any) -> list[Any]:
    """Bare objects (and their bytes) until ``until(obj)`` holds for one."""
    out: list[Any] = []
    while True:
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(bytes(buf))
        try:
            obj = unpacker.unpack()
        except msgpack.OutOfData:
            buf += await stream.receive()
            continue
        raw = bytes(buf[: unpacker.tell()])
        del buf[: unpacker.tell()]
        out.append((obj, raw))
        if until(obj):
            return out


@pytest.mark.anyio
async def test_granted_worker_gets_bare_objects_and_a_plain_one_frames(address: str, transport: str) -> None:
    b = Broker(transport=transport)
    inner = [
        encode_event(NATIVE, "s", "small", 1, 9),
        encode_event(NATIVE, "s", "big", "x" * 60_000, 9),
        encode_event(NATIVE, "s", "map", {"k": [1, 2.5, None, True], "b": b"\x00\xff"}, 9),
    ]
    async with anyio.create_task_group() as tg:
        await tg.start(b.serve, address)
        with anyio.fail_after(10):
            bare, bare_buf = await _raw_worker(address, transport, encode_hello(NATIVE, 1, os.getpid(), CAPS))
            # The welcome itself is a frame: it says whether what follows is unframed.
            welcome = decode_welcome(NATIVE, await _read_frame(bare, bare_buf))
            assert "unframed" in welcome.caps
            plain, plain_buf = await _raw_worker(address, transport, encode_hello(NATIVE, 2, os.getpid()))
            pub, _ = await _raw_worker(address, transport, encode_hello(NATIVE, 3, os.getpid()))
            # (connected: each sees its own first publish; wait for the broker to know all three)
            await wait_until(lambda: len(b.statistics().workers) == 3)
            await pub.send(b"".join(encode_frame(encode_publish(NATIVE, ALL, e)) for e in inner))
            # Byte for byte: the events back to back, no headers; framed for the plain one.
            expected = b"".join(inner)
            assert await _read_bytes(bare, bare_buf, len(expected)) == expected
            framed = b"".join(encode_frame(e) for e in inner)
            assert await _read_bytes(plain, plain_buf, len(framed)) == framed
            # The pong is a bare object too; the ping (client -> broker) stays a frame.
            await bare.send(encode_frame(encode_ping(NATIVE, 5)))
            pong = encode_pong(NATIVE, 5)
            assert await _read_bytes(bare, bare_buf, len(pong)) == pong
            assert not bare_buf and not plain_buf
            for s in (bare, plain, pub):
                await s.aclose()
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_unframed_is_not_granted_without_the_welcome(address: str, transport: str) -> None:
    b = Broker(transport=transport)
    async with anyio.create_task_group() as tg:
        await tg.start(b.serve, address)
        with anyio.fail_after(10):
            stream, buf = await _raw_worker(address, transport, encode_hello(NATIVE, 1, 1, ("unframed",)))
            inner = encode_event(NATIVE, "s", "e", None, 1)
            await stream.send(encode_frame(encode_publish(NATIVE, ALL, inner)))
            assert await _read_frame(stream, buf) == inner  # framed: no welcome said otherwise
            await stream.aclose()
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_lifecycle_events_and_dropped_notices_come_bare(address: str, transport: str) -> None:
    # Worker 1 does not read while big events overflow its queue (2 deep): the broker's
    # own deliveries (the welcome lifecycle event, "joined", the "dropped" notice) reach
    # it bare, like the events.
    b = Broker(transport=transport, lifecycle_events=True, max_queue_len=2, overflow=OverflowPolicy.DROP_NEWEST)
    big = encode_event(NATIVE, "s", "big", "x" * 60_000, 2)
    async with anyio.create_task_group() as tg:
        await tg.start(b.serve, address)
        with anyio.fail_after(20):
            stream, buf = await _raw_worker(address, transport, encode_hello(NATIVE, 1, os.getpid(), CAPS))
            assert "unframed" in decode_welcome(NATIVE, await _read_frame(stream, buf)).caps
            first = await _read_objects(stream, buf, lambda o: o.get("event") == "welcome")
            assert first[-1][0]["source"] == "workerbus"
            pub, _ = await _raw_worker(address, transport, encode_hello(NATIVE, 2, os.getpid()))
            for _ in range(8):  # bounded: each round overflows a queue of 2 (60 KB events)
                await pub.send(encode_frame(encode_publish(NATIVE, ALL, big)) * 40)
                if b.router.statistics().dropped:
                    break
                await anyio.sleep(0.05)
            assert b.router.statistics().dropped > 0
            seen = await _read_objects(stream, buf, lambda o: o.get("event") == "dropped")
            seen += await _read_objects(stream, buf, lambda o: o.get("source") == "s")
            kinds = {(o["source"], o["event"]) for o, _ in seen}
            assert ("workerbus", "joined") in kinds and ("s", "big") in kinds
            assert all(raw == big for o, raw in seen if o["source"] == "s")
            await stream.aclose()
            await pub.aclose()
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_handlers_see_the_same_with_and_without_unframed(address: str, transport: str) -> None:
    b = Broker(transport=transport)
    sent: list[tuple[str, str, Any]] = []
    async with anyio.create_task_group() as tg:
        await tg.start(b.serve, address)
        async with (
            Client(address, transport=transport, worker_id=1) as bare,
            Client(address, transport=transport, worker_id=2, unframed=False) as framed,
            Client(address, transport=transport, worker_id=3) as pub,
        ):
            recs = Recorder(), Recorder()
            bare.subscribe("*", "*", recs[0])
            framed.subscribe("*", "*", recs[1])
            with anyio.fail_after(30):
                for c in (bare, framed, pub):
                    await c.wait_ready()
                assert bare.welcome is not None and "unframed" in bare.welcome.caps
                assert framed.welcome is not None and "unframed" not in framed.welcome.caps
                # Many reads' worth, sizes up to the limit, so objects span reads.
                for i in range(3000):
                    data: Any = {"i": i, "pad": "y" * (i % 50)}
                    if i % 500 == 7:
                        data = "z" * 65_000
                    elif i % 300 == 1:
                        data = [None, 1.5, b"\x01", {"n": i}]
                    await pub.publish("src", f"ev{i % 3}", data)
                    sent.append(("src", f"ev{i % 3}", data))
                await pub.flush()
                await recs[0].wait_for(3000, timeout=30)
                await recs[1].wait_for(3000, timeout=30)
            assert recs[0].events == recs[1].events
            assert [r[:3] for r in recs[0].events] == sent
            assert [r[3] for r in recs[0].events] == [3] * 3000
            for c in (bare, framed):
                stats = c.statistics()
                assert (stats.undecodable, stats.connects) == (0, 1)
        tg.cancel_scope.cancel()


class _Counting(ClientHooks):
    def decode_batch(self, client: Client, payloads: list[bytes]) -> tuple[list[Fields], list[RemoteProtocolError]]:
        return super().decode_batch(client, payloads)


class _CountingBoth(_Counting):
    def decode_objects(self, client: Client, objects: list[object]) -> tuple[list[Fields], list[RemoteProtocolError]]:
        return super().decode_objects(client, objects)


def test_asked_only_by_clients_that_decode_objects() -> None:
    def caps(**options: Any) -> tuple[str, ...]:
        return Client("unix:/nonexistent", transport="stream", **options)._caps

    assert "unframed" in caps()
    assert "unframed" not in caps(unframed=False)
    assert caps(profile="kong") == ()
    # A layer that checks payloads itself (embed's sequence check) gets frames...
    assert "unframed" not in caps(hooks=_Counting())
    hooks = ClientHooks()
    hooks.decode_batch = _Counting().decode_batch  # type: ignore[method-assign]
    assert "unframed" not in caps(hooks=hooks)
    # ...unless it decodes objects too.
    assert "unframed" in caps(hooks=_CountingBoth())


@pytest.mark.anyio
async def test_a_bad_object_ends_the_connection_after_the_good_ones(
    address: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A broker that grants "unframed" and then writes bytes that are no MessagePack object:
    # what came before them is handled, the connection ends (logged), the client reconnects.
    path = parse_address(address)
    good = encode_event(NATIVE, "s", "good", 1, 0)
    hellos: list[bytes] = []

    async def serve(stream: Any) -> None:
        async with stream:
            buf = bytearray()
            hellos.append(await _read_frame(stream, buf))
            welcome = Welcome(1, "fake", "native", 7, frozenset(CAPS), 65535, 10, 1.0)
            await stream.send(encode_frame(encode_welcome(NATIVE, welcome)) + good + b"\xc1" + good)
            with anyio.move_on_after(10), contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                while await stream.receive():  # (until the client hangs up)
                    pass

    caplog.set_level(logging.INFO, logger="shared.client")
    async with anyio.create_task_group() as tg:
        await tg.start(serve_unix, path, serve)
        async with Client(address, transport="stream", worker_id=7) as c:
            rec = Recorder()
            c.subscribe("*", "*", rec)
            with anyio.fail_after(10):
                await wait_until(lambda: c.statistics().connects >= 2 and len(rec.events) >= 2, timeout=10)
            # One good event per connection: never the one after the bad byte.
            assert all(r[1] == "good" for r in rec.events)
            assert len(rec.events) <= c.statistics().connects
        tg.cancel_scope.cancel()
    assert all(NATIVE.codec.loads(h)["caps"] for h in hellos)  # type: ignore[index]
    assert any("broke the protocol" in r.getMessage() and "undecodable" in r.getMessage() for r in caplog.records)


@pytest.mark.anyio
async def test_object_stream_decodes_a_read_a_piece_at_a_time_and_hands_over_the_rest(address: str) -> None:
    # One large read, decoded a piece per receive() (the maps of a whole read alive at
    # once cost more per event); what a cut-off reader has read still comes out (rest()).
    from shared.stream import ObjectStream

    events = [encode_event(NATIVE, "s", "e", {"i": i, "pad": "p" * 40}, 1) for i in range(3000)]
    wanted = [NATIVE.codec.loads(e) for e in events]
    path = parse_address(address)

    async def serve(stream: Any) -> None:
        async with stream:
            await stream.send(b"".join(events))

    async with anyio.create_task_group() as tg:
        await tg.start(serve_unix, path, serve)
        with anyio.fail_after(10):
            objects = ObjectStream(await anyio.connect_unix(path), max_len=NATIVE.max_frame_len)
            got: list[object] = []
            sizes = []
            while len(got) < 1000:
                chunk = await objects.receive()
                sizes.append(len(chunk))
                got += chunk
            assert max(sizes) < 600  # (a piece is 16 KiB: ~250 of these events)
            got += objects.rest()
            while len(got) < len(wanted):  # what had not arrived by the first read
                got += await objects.receive()
            assert got == wanted
            await objects.aclose()
        tg.cancel_scope.cancel()
