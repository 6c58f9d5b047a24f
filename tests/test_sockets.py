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

from shared.sockets import GuardedStream, TransportStream, connect_unix, guard

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
