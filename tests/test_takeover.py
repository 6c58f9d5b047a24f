"""What makes a failover quick: the new broker's takeover hold, and the HTTP hello sent
with the upgrade request. Real sockets and
files, both transports and both backends; tests/test_embed_processes.py kills real
processes."""

from __future__ import annotations

import logging

import anyio
import anyio.abc
import pytest

from shared.broker import Broker
from shared.client import Client
from shared.frame import encode_frame
from shared.messages import decode_hello
from shared.profile import NATIVE

from .helpers import Recorder

pytestmark = pytest.mark.anyio


async def _flushed(client: Client, done: anyio.Event) -> None:
    await client.flush()
    done.set()


async def test_takeover_routes_after_every_awaited_hello(address: str, transport: str) -> None:
    # Workers 0, 1 and 2 were connected to a broker that died. Worker 0 is back first and
    # publishes at once: nothing is routed (its flush waits) until 1 and 2 said hello,
    # and then each worker gets the held "joined" events together, before that publish.
    b = Broker(transport=transport, expected_workers=3, lifecycle_events=True)
    b.await_reconnects([0, 1, 2], timeout=30)
    rec = Recorder()
    async with anyio.create_task_group() as tg:
        await tg.start(b.serve, address)
        async with Client(address, transport=transport, worker_id=0) as c0, Client(
            address, transport=transport, worker_id=1
        ) as c1:
            c1.subscribe("*", "*", rec)
            with anyio.fail_after(5):
                await c0.wait_ready()
            await c0.publish("t", "x", 1, "others")
            flushed = anyio.Event()
            tg.start_soon(_flushed, c0, flushed)
            with anyio.fail_after(5):
                await c1.wait_ready()
            # c1 is welcomed, so the broker ran c1's handshake after c0's ping had arrived;
            # the ping's pong waits behind the hold all the same.
            assert not flushed.is_set()
            async with Client(address, transport=transport, worker_id=2):
                with anyio.fail_after(5):
                    await flushed.wait()
                    await rec.wait_for(5)
        tg.cancel_scope.cancel()
    seen = [(s, e, d.get("worker_id") if isinstance(d, dict) else d) for s, e, d, _ in rec.events]
    assert seen[0] == ("workerbus", "welcome", 1)
    # (in the order the hellos came: c0 and c1 connect concurrently)
    assert sorted(seen[1:4]) == [("workerbus", "joined", 0), ("workerbus", "joined", 1), ("workerbus", "joined", 2)]
    assert seen[4] == ("t", "x", 1)


async def test_takeover_hold_ends_at_its_deadline(
    address: str, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Worker 7 never comes back: routing resumes after the timeout, and the log says why.
    caplog.set_level(logging.INFO, logger="shared.broker")
    b = Broker(transport=transport, lifecycle_events=True)
    b.await_reconnects([0, 7], timeout=0.3)
    rec = Recorder()
    async with anyio.create_task_group() as tg:
        started = anyio.current_time()
        await tg.start(b.serve, address)
        async with Client(address, transport=transport, worker_id=0) as c0:
            c0.subscribe("t", "*", rec)
            await c0.publish("t", "own", None, "all")
            with anyio.fail_after(10):
                await c0.flush()
                await rec.wait_for(1)
            assert anyio.current_time() - started >= 0.3
        tg.cancel_scope.cancel()
    assert [e[1] for e in rec.events] == ["own"]
    assert "routing resumes after 0.3s without the hellos of workers 7" in caplog.text


async def test_a_broker_without_a_takeover_routes_at_once(address: str, transport: str) -> None:
    # No await_reconnects: nothing is held (a plain broker, an embedded first start
    # with nobody else alive is the same with an empty set).
    b = Broker(transport=transport, lifecycle_events=True)
    b.await_reconnects([], timeout=30)
    rec = Recorder()
    async with anyio.create_task_group() as tg:
        await tg.start(b.serve, address)
        async with Client(address, transport=transport, worker_id=0) as c0:
            c0.subscribe("t", "*", rec)
            await c0.publish("t", "own", None, "all")
            with anyio.fail_after(5):
                await c0.flush()
                await rec.wait_for(1)
        tg.cancel_scope.cancel()


async def test_http_client_sends_its_hello_with_the_upgrade_request(address: str) -> None:
    # The hello does not wait for the 101: a broker that has not answered yet already
    # has the request head and the hello in its socket.
    path = address[len("unix:") :]
    got = bytearray()
    listener = await anyio.create_unix_listener(path)
    async with listener, anyio.create_task_group() as tg:

        async def client() -> None:
            async with Client(address, transport="http", worker_id=3):
                await anyio.sleep_forever()

        tg.start_soon(client)
        with anyio.fail_after(5):
            stream = await listener.accept()
            async with stream:
                while b"\r\n\r\n" not in got or len(got) < got.index(b"\r\n\r\n") + 6:
                    got += await stream.receive()
                head, rest = bytes(got).split(b"\r\n\r\n", 1)
                assert head.startswith(b"GET / HTTP/1.1")
                size = int.from_bytes(rest[:2], "big")
                while len(rest) < 2 + size:
                    rest += await stream.receive()
                hello = decode_hello(NATIVE, rest[2 : 2 + size])
                assert hello.worker_id == 3
                assert rest[: 2 + size] == encode_frame(rest[2 : 2 + size])
        tg.cancel_scope.cancel()
