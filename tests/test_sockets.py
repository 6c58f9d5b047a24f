"""shared/sockets.py: the Unix socket streams every connection of the bus runs on.

On asyncio's own loop they are asyncio transports (TransportStream: the socket stays
registered for reading), elsewhere raw sockets (GuardedStream). Both are held to the same
contract here, through real Unix sockets, on both backends: reads bounded by max_bytes and
in order, end of stream and half-close, nothing lost to a cancelled receive, a send that
returns once the socket took every byte, send_nowait, close and hang-up, and a reader that
does not read holds back its peer (a bounded read-ahead, then the kernel's buffer).
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator

import anyio
import pytest
from anyio.abc import ByteStream, SocketAttribute

from shared.errors import RemoteProtocolError
from shared.frame import encode_frame
from shared.sockets import GuardedStream, TransportStream, connect_unix, guard
from shared.stream import FrameStream
from tests.helpers import wait_until

pytestmark = pytest.mark.anyio


async def _pair(path: str) -> tuple[ByteStream, ByteStream]:
    """(client end, server end), both guarded as the bus guards them."""
    listener = await anyio.create_unix_listener(path)
    try:
        client = await connect_unix(path)
        server = await guard(await listener.accept())
    finally:
        await listener.aclose()
    return client, server


@pytest.fixture
async def pair(sock_dir: str) -> AsyncIterator[tuple[ByteStream, ByteStream]]:
    client, server = await _pair(os.path.join(sock_dir, "pair.sock"))
    try:
        yield client, server
    finally:
        await anyio.aclose_forcefully(client)
        await anyio.aclose_forcefully(server)


async def test_the_stream_kind_follows_the_loop(pair: tuple[ByteStream, ByteStream], anyio_backend: str) -> None:
    client, server = pair
    kind = TransportStream if anyio_backend == "asyncio" else GuardedStream
    assert type(client) is kind and type(server) is kind
    # what the broker reads from a connection: the raw socket (peer credentials, hang-up)
    assert isinstance(server.extra(SocketAttribute.raw_socket), socket.socket)


async def test_reads_are_bounded_and_in_order(pair: tuple[ByteStream, ByteStream]) -> None:
    client, server = pair
    await client.send(b"0123456789")
    got = b""
    with anyio.fail_after(5):
        while len(got) < 10:
            part = await server.receive(3)
            assert 1 <= len(part) <= 3
            got += part
    assert got == b"0123456789"


async def test_end_of_stream_and_half_close(pair: tuple[ByteStream, ByteStream]) -> None:
    client, server = pair
    await client.send(b"last words")
    assert isinstance(client, (TransportStream, GuardedStream))
    await client.send_eof()
    got = b""
    with anyio.fail_after(5):
        while True:
            try:
                got += await server.receive()
            except anyio.EndOfStream:
                break
        assert got == b"last words"
        with pytest.raises(anyio.EndOfStream):
            await server.receive()  # and again
        # the other direction still works (a polite close drains both ways)
        await server.send(b"bye")
        assert await client.receive() == b"bye"
        await server.aclose()
        with pytest.raises(anyio.EndOfStream):
            await client.receive()


async def test_a_cancelled_receive_loses_nothing(pair: tuple[ByteStream, ByteStream]) -> None:
    client, server = pair
    with anyio.move_on_after(0.05):
        await server.receive()  # nothing comes: cancelled while waiting
    await client.send(b"after the cancel")
    got = b""
    for _ in range(3):
        with anyio.CancelScope() as scope:
            scope.cancel()
            # cancelled: it raises (the bytes stay for the next receive), or the bytes
            # were there first and it returns them; never both lost
            got += await server.receive()
        await anyio.sleep(0.01)
    with anyio.fail_after(5):
        while len(got) < 16:
            got += await server.receive()
    assert got == b"after the cancel"


async def test_send_returns_once_the_socket_took_everything(pair: tuple[ByteStream, ByteStream]) -> None:
    client, server = pair
    payload = os.urandom(3 << 20)  # far more than a socket buffer
    received = bytearray()
    sent = anyio.Event()

    async def read_all() -> None:
        while len(received) < len(payload):
            received.extend(await server.receive(1 << 16))
            if not sent.is_set():
                await anyio.sleep(0.001)  # a slow reader: the sender has to wait

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(read_all)
            await client.send(payload)
            sent.set()
            # every byte was handed to the kernel: the reader gets them all without us
    assert bytes(received) == payload


async def test_send_nowait_writes_what_the_socket_takes(pair: tuple[ByteStream, ByteStream]) -> None:
    client, server = pair
    assert isinstance(client, (TransportStream, GuardedStream))
    assert client.send_nowait(b"now") == 3
    assert await server.receive() == b"now"
    # nobody reads: the socket fills up, then send_nowait takes nothing
    total = 0
    for _ in range(10_000):
        n = client.send_nowait(b"x" * 65536)
        total += n
        if n == 0:
            break
    else:
        pytest.fail("the socket never filled up")
    assert 0 < total < 64 << 20


async def test_close_wakes_a_waiting_receive(pair: tuple[ByteStream, ByteStream]) -> None:
    client, server = pair
    outcome: list[type[BaseException]] = []

    async def wait() -> None:
        try:
            await server.receive()
        except (anyio.ClosedResourceError, anyio.EndOfStream, anyio.BrokenResourceError) as exc:
            outcome.append(type(exc))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.wait_all_tasks_blocked()  # (it waits by then)
            await server.aclose()
    assert outcome == [anyio.ClosedResourceError]
    with pytest.raises(anyio.ClosedResourceError):
        await server.send(b"x")


async def test_the_peer_going_away(pair: tuple[ByteStream, ByteStream]) -> None:
    client, server = pair
    await client.aclose()
    with anyio.fail_after(5):
        with pytest.raises(anyio.EndOfStream):
            await server.receive()
        with pytest.raises(anyio.BrokenResourceError):
            for _ in range(100):  # (the first writes may still land in the kernel)
                await server.send(b"x" * 65536)


async def test_a_hang_up_ends_both_directions(pair: tuple[ByteStream, ByteStream]) -> None:
    # What the broker does to a connection it drops (Broker._hang_up): shut the raw socket
    # down; the reader sees the end, a write fails.
    client, server = pair
    server.extra(SocketAttribute.raw_socket).shutdown(socket.SHUT_RDWR)
    with anyio.fail_after(5):
        with pytest.raises(anyio.EndOfStream):
            await server.receive()
        with pytest.raises(anyio.BrokenResourceError):
            await server.send(b"x")
        with pytest.raises(anyio.EndOfStream):
            await client.receive()


async def test_a_reader_that_does_not_read_holds_its_peer_back(pair: tuple[ByteStream, ByteStream]) -> None:
    # The transport reads ahead a bounded amount, then leaves the rest in the kernel, so
    # a client that stops reading (full inbox) still stops the broker's writes.
    client, server = pair
    assert isinstance(server, (TransportStream, GuardedStream))
    total = 0
    with anyio.fail_after(10):
        idle_rounds = 0
        while idle_rounds < 20:  # the transport gets a few turns to read ahead
            n = server.send_nowait(b"y" * 65536)
            total += n
            idle_rounds = idle_rounds + 1 if n == 0 else 0
            await anyio.sleep(0.001)
    assert total < 16 << 20  # bounded: kernel buffers plus at most a read-ahead
    got = 0
    with anyio.fail_after(10):
        while got < total:
            got += len(await client.receive(1 << 20))
    assert got == total


# --- reads handled in the transport's callback (FrameStream.read_inline) -----------------
#
# The broker lets a read that arrives while its reader waits be routed right in the
# transport's callback. On asyncio's selector loop the frames then go to the callback and
# the waiting receive stays parked; elsewhere (trio) nothing changes and receive returns
# them. Either way every frame arrives once, in order, parsed by the one frame decoder.


class _Inline:
    """A FrameStream over the server end with read_inline turned on, read by a task the
    way the broker reads: the same step for the frames of a read, whoever has them."""

    def __init__(self, server: ByteStream, *, max_frame_len: int = 1000) -> None:
        self.frames = FrameStream(server, header_len=2, max_frame_len=max_frame_len)
        self.inline: list[bytes] = []  # frames the step got in the transport's callback
        self.received: list[bytes] = []  # frames the step got from receive
        self.error: BaseException | None = None
        self.allow = True
        self.fail_on: bytes | None = None
        self.changed = anyio.Event()
        self.frames.read_inline(lambda frames: self.step(frames, self.inline), lambda: self.allow)

    def step(self, frames: list[bytes], into: list[bytes]) -> None:
        for frame in frames:
            if frame == self.fail_on:
                raise ValueError(f"refused {frame!r}")
            into.append(frame)
        self.changed.set()
        self.changed = anyio.Event()

    async def read(self) -> None:
        try:
            while True:
                self.step(await self.frames.receive(), self.received)
        except Exception as exc:  # what the test looks at
            self.error = exc
            self.changed.set()

    @property
    def got(self) -> list[bytes]:
        return sorted(self.inline + self.received, key=lambda f: int(f.split(b":")[1]))

    async def wait_for(self, count: int) -> None:
        with anyio.fail_after(5):
            while len(self.inline) + len(self.received) < count and self.error is None:
                await self.changed.wait()


def _frames(*payloads: bytes) -> bytes:
    return b"".join(encode_frame(p) for p in payloads)


async def test_reads_go_to_the_callback_while_the_reader_waits(
    pair: tuple[ByteStream, ByteStream], anyio_backend: str
) -> None:
    client, server = pair
    reader = _Inline(server)
    async with anyio.create_task_group() as tg:
        tg.start_soon(reader.read)
        expected = []
        for i in range(20):
            payload = b"f:%d" % i
            expected.append(payload)
            await client.send(encode_frame(payload))
            await reader.wait_for(len(expected))  # (one read per frame: the reader parks)
        # a frame split over two reads: the decoder's own buffering, frame_started set
        whole = encode_frame(b"f:20")
        await client.send(whole[:3])
        await wait_until(lambda: reader.frames.frame_started is not None)
        await client.send(whole[3:])
        expected.append(b"f:20")
        await reader.wait_for(21)
        assert reader.frames.frame_started is None
        tg.cancel_scope.cancel()
    assert reader.error is None
    assert reader.inline + reader.received == expected  # each once, in order
    if anyio_backend == "asyncio":
        assert reader.inline == expected and reader.received == []
    else:
        assert reader.inline == [] and reader.received == expected


async def test_the_gate_and_turning_it_off_leave_reads_to_the_reader(pair: tuple[ByteStream, ByteStream]) -> None:
    client, server = pair
    reader = _Inline(server)
    reader.allow = False
    async with anyio.create_task_group() as tg:
        tg.start_soon(reader.read)
        await client.send(encode_frame(b"f:0"))
        await reader.wait_for(1)
        reader.frames.read_inline(None, lambda: True)
        reader.allow = True
        await client.send(encode_frame(b"f:1"))
        await reader.wait_for(2)
        tg.cancel_scope.cancel()
    assert reader.inline == [] and reader.received == [b"f:0", b"f:1"]


async def test_what_the_callback_fails_with_the_reader_raises(pair: tuple[ByteStream, ByteStream]) -> None:
    # The broker's routing of a read raises RemoteProtocolError at a bad frame (after the
    # ones before it): the reader must end with it, as if it had routed the read itself.
    client, server = pair
    reader = _Inline(server)
    reader.fail_on = b"f:2"
    async with anyio.create_task_group() as tg:
        tg.start_soon(reader.read)
        await client.send(encode_frame(b"f:0"))
        await reader.wait_for(1)
        await client.send(_frames(b"f:1", b"f:2", b"f:3"))
        with anyio.fail_after(5):
            while reader.error is None:
                await reader.changed.wait()
    assert reader.got[:2] == [b"f:0", b"f:1"]
    assert isinstance(reader.error, ValueError) and "f:2" in str(reader.error)


async def test_an_oversize_frame_in_the_callback_ends_the_reader(pair: tuple[ByteStream, ByteStream]) -> None:
    # Limits before memory: the header announcing too much is refused at once.
    client, server = pair
    reader = _Inline(server, max_frame_len=100)
    async with anyio.create_task_group() as tg:
        tg.start_soon(reader.read)
        await client.send(encode_frame(b"f:0"))
        await reader.wait_for(1)
        await client.send(encode_frame(b"f:1") + (5000).to_bytes(2, "big"))
        with anyio.fail_after(5):
            while reader.error is None:
                await reader.changed.wait()
    assert reader.got == [b"f:0", b"f:1"]
    assert isinstance(reader.error, RemoteProtocolError)
    with pytest.raises(RemoteProtocolError):
        await reader.frames.receive()  # latched


async def test_a_cancelled_reader_leaves_the_bytes_for_the_next_receive(pair: tuple[ByteStream, ByteStream]) -> None:
    client, server = pair
    reader = _Inline(server)
    with anyio.move_on_after(0.05):
        await reader.frames.receive()  # nothing comes: cancelled while waiting
    await client.send(encode_frame(b"f:0"))  # nobody waits: not taken by the callback
    await anyio.sleep(0.01)
    assert reader.inline == []
    with anyio.fail_after(5):
        assert await reader.frames.receive() == [b"f:0"]


async def test_large_transfers_arrive_whole_and_in_order(sock_dir: str, anyio_backend: str) -> None:
    # On asyncio's loop the transport reads at most 64 KiB at a time (a 256 KiB read costs
    # malloc an mmap, an mremap and an munmap: shared/sockets.py) until a read fills that,
    # then 256 KiB (a busy peer: fewer, larger batches); a receive gets what several reads
    # brought, up to its max_bytes. Two connections at once, ~1.2 MiB each, patterns that
    # a mix-up between reads or connections would break.
    a_client, a_server = await _pair(os.path.join(sock_dir, "a.sock"))
    b_client, b_server = await _pair(os.path.join(sock_dir, "b.sock"))
    try:
        if anyio_backend == "asyncio":
            assert isinstance(a_server, TransportStream)
            assert a_server._transport.max_size <= 64 * 1024  # type: ignore[attr-defined]
        pattern = bytes(range(251)) * 5000  # no period of a power of two
        async with anyio.create_task_group() as tg:
            tg.start_soon(a_client.send, pattern)
            tg.start_soon(b_client.send, pattern[::-1])
            got_a: list[bytes] = []
            got_b: list[bytes] = []
            with anyio.fail_after(10):
                while sum(map(len, got_a)) < len(pattern) or sum(map(len, got_b)) < len(pattern):
                    if sum(map(len, got_a)) < len(pattern):
                        got_a.append(await a_server.receive(1 << 20))
                    if sum(map(len, got_b)) < len(pattern):
                        got_b.append(await b_server.receive(1 << 20))
        assert b"".join(got_a) == pattern
        assert b"".join(got_b) == pattern[::-1]
        if anyio_backend == "asyncio":
            assert a_server._transport.max_size == 256 * 1024  # type: ignore[attr-defined]
    finally:
        for stream in (a_client, a_server, b_client, b_server):
            await anyio.aclose_forcefully(stream)
