"""The negotiated native extensions (docs/protocol.md §8): welcome, ping/pong barrier,
default ids. Real sockets; the command-line cases run real processes."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import anyio
import anyio.abc
import msgpack
import pytest

from shared.broker import Broker
from shared.client import Client
from shared.errors import BarrierBroken, NoWelcome
from shared.frame import encode_frame
from shared.messages import OTHERS, build_publish_frame, decode_welcome, encode_hello, encode_ping
from shared.profile import NATIVE
from shared.transport import get_transport, parse_address

from .helpers import Recorder, wait_until
from .proc import PY, broker, running, wait_for_socket, workerbus


async def _raw_worker(address: str, transport: str, hello: bytes) -> Any:
    stream, initial = await get_transport(transport).connect(parse_address(address))
    await stream.send(encode_frame(hello))
    return stream, initial


async def _read_frames(stream: Any, initial: bytes, count: int) -> list[bytes]:
    """The next ``count`` native frames (bounded by the caller's deadline)."""
    buf = bytearray(initial)
    out: list[bytes] = []
    while len(out) < count:
        while len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big"):
            size = int.from_bytes(buf[:2], "big")
            out.append(bytes(buf[2 : 2 + size]))
            del buf[: 2 + size]
        if len(out) < count:
            buf += await stream.receive()
    return out


# --- the welcome ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_welcome_tells_limits_id_and_caps(address: str, transport: str) -> None:
    b = Broker(transport=transport, max_payload_len=300, max_queue_len=77, unique_timeout=1.5)
    async with anyio.create_task_group() as tg:
        await tg.start(b.serve, address)
        async with Client(address, transport=transport, worker_id=7, max_payload_len=1000) as c:
            with anyio.fail_after(5):
                await c.wait_ready()
            w = c.welcome
            assert w is not None
            assert (w.version, w.profile, w.worker_id) == (1, "native", 7)
            assert w.broker.startswith("workerbus ")
            assert w.caps == {"welcome", "barrier", "cluster", "filter", "unframed"}
            assert (w.max_payload_len, w.max_queue_len, w.unique_timeout) == (300, 77, 1.5)
            assert c.max_payload_len == 300  # min(own 1000, broker's 300)
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_plain_hello_gets_no_welcome_and_unknown_caps_are_ignored(address: str, transport: str) -> None:
    b = Broker(transport=transport)
    async with anyio.create_task_group() as tg:
        await tg.start(b.serve, address)
        with anyio.fail_after(5):
            # A plain hello: the first frame is our own echo, nothing before it.
            stream, initial = await _raw_worker(address, transport, encode_hello(NATIVE, 5, 1))
            publish = b"\x82\xa4spec\x80\xa4data\xc4\x03abc"
            await stream.send(encode_frame(publish))
            assert await _read_frames(stream, initial, 1) == [b"abc"]
            await stream.aclose()
            # Unknown names are ignored: only what this broker has is granted.
            hello = encode_hello(NATIVE, 6, 1, ("welcome", "zz-unknown", "x" * 32))
            stream, initial = await _raw_worker(address, transport, hello)
            (first,) = await _read_frames(stream, initial, 1)
            assert decode_welcome(NATIVE, first).caps == {"welcome"}
            await stream.aclose()
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_too_many_caps_is_a_protocol_error(address: str, transport: str) -> None:
    b = Broker(transport=transport)
    async with anyio.create_task_group() as tg:
        await tg.start(b.serve, address)
        with anyio.fail_after(5):
            hello = NATIVE.codec.dumps({"id": 5, "pid": 1, "caps": [str(i) for i in range(33)]})
            stream, initial = await _raw_worker(address, transport, hello)
            async with stream:
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await _read_frames(stream, initial, 1)
        assert b.statistics().refused == 1
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_stream_client_against_http_broker_fails_wait_ready_clearly(address: str) -> None:
    b = Broker(transport="http")
    async with anyio.create_task_group() as tg:
        await tg.start(b.serve, address)
        async with Client(address, transport="stream", connect_timeout=2) as c:
            with anyio.fail_after(5), pytest.raises(NoWelcome) as info:
                await c.wait_ready()
            assert info.value.cause == "transport"
            assert "HTTP/1.1 400" in str(info.value) and "transport 'http'" in str(info.value)
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_http_client_against_stream_broker_is_told_what_it_reached(address: str) -> None:
    # The stream broker answers an HTTP request with a 400 that says so; the client's
    # message used to add "is it a stream-transport broker?" to a body that said
    # "use --transport http", two hints pointing opposite ways.
    b = Broker(transport="stream")
    async with anyio.create_task_group() as tg:
        await tg.start(b.serve, address)
        async with Client(address, transport="http", connect_timeout=2) as c:
            with anyio.fail_after(5), pytest.raises(NoWelcome) as info:
                await c.wait_ready()
            message = str(info.value)
            assert info.value.cause == "transport"
            assert "it is a stream-transport broker" in message and "use transport 'stream'" in message
            assert "is it" not in message and "--transport http" not in message
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_native_client_against_kong_broker_fails_wait_ready(address: str, transport: str) -> None:
    b = Broker(transport=transport, profile="kong", handshake_timeout=5)
    async with anyio.create_task_group() as tg:
        await tg.start(b.serve, address)
        async with Client(address, transport=transport, connect_timeout=0.5) as c:
            with anyio.fail_after(5), pytest.raises(NoWelcome) as info:
                await c.wait_ready()
            assert "profile 'kong'" in str(info.value)
        tg.cancel_scope.cancel()


# --- the barrier ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_flush_returns_after_the_broker_routed_everything(address: str, transport: str) -> None:
    b = Broker(transport=transport, expected_workers=2)
    async with anyio.create_task_group() as tg:
        await tg.start(b.serve, address)
        async with Client(address, transport=transport, worker_id=0) as c:
            with anyio.fail_after(10):
                await c.wait_ready()
                for i in range(3000):
                    await c.publish("s", "e", i)
                await c.flush()
                # Routed means queued for worker 1 (not connected) too, at the pong.
                assert len(b.router.queues[1].frames) == 3000
                assert c.statistics().unconfirmed == 0
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_pongs_bypass_a_full_queue(address: str, transport: str) -> None:
    # Worker 0's queue overflows (it holds 5), yet its pong still arrives.
    b = Broker(transport=transport, expected_workers=1, max_queue_len=5)
    async with anyio.create_task_group() as tg:
        await tg.start(b.serve, address)
        async with Client(address, transport=transport, worker_id=0) as c:
            rec = Recorder()
            c.subscribe("*", "*", rec)
            with anyio.fail_after(10):
                await c.wait_ready()
                for i in range(200):
                    c.publish_nowait("s", "e", i)
                await c.flush()
                assert c.statistics().undecodable == 0
        # Handlers saw events only (ours, and the broker's "dropped" notice): no pong.
        assert {ev[0] for ev in rec.events} <= {"s", "workerbus"}
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_ping_without_the_grant_is_a_protocol_error(address: str, transport: str) -> None:
    b = Broker(transport=transport)
    async with anyio.create_task_group() as tg:
        await tg.start(b.serve, address)
        with anyio.fail_after(5):
            hello = encode_hello(NATIVE, 5, 1, ("welcome",))
            stream, initial = await _raw_worker(address, transport, hello)
            async with stream:
                await stream.send(encode_frame(encode_ping(NATIVE, 1)))
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await _read_frames(stream, initial, 2)  # the welcome, then the close
        await wait_until(lambda: b.statistics().protocol_errors == 1)
        tg.cancel_scope.cancel()


class _FrameReader:
    """Native frames off a raw stream, keeping what a read brings beyond a frame."""

    def __init__(self, stream: Any, initial: bytes) -> None:
        self.stream = stream
        self.buf = bytearray(initial)

    async def next(self) -> bytes:
        while len(self.buf) < 2 or len(self.buf) < 2 + int.from_bytes(self.buf[:2], "big"):
            self.buf += await self.stream.receive()
        size = int.from_bytes(self.buf[:2], "big")
        frame = bytes(self.buf[2 : 2 + size])
        del self.buf[: 2 + size]
        return frame


def _pong(frame: bytes) -> int | None:
    # (the welcome and lifecycle events also come this way: only the pongs count)
    msg = msgpack.unpackb(frame)
    return msg["pong"] if isinstance(msg, dict) and "pong" in msg else None


@pytest.mark.anyio
async def test_a_ping_that_ends_a_read_is_answered_after_its_publishes(address: str, transport: str) -> None:
    # A flushing publisher's write: publishes, then a ping, in one send. The broker knows
    # such a ping by its bytes (messages.usual_ping); every msgpack width of n must come
    # back as the same pong, each after the publishes before it are routed, and a frame
    # that only looks like a ping still ends the connection after those.
    ns = [0, 127, 128, 65535, 65536, 2**32, 2**64 - 1]
    b = Broker(transport=transport)
    async with anyio.create_task_group() as tg:
        await tg.start(b.serve, address)
        async with Client(address, transport=transport, worker_id=2) as sub:
            rec = Recorder()
            sub.subscribe("s", "*", rec)
            with anyio.fail_after(10):
                await sub.wait_ready()
                hello = encode_hello(NATIVE, 5, 1, ("welcome", "barrier"))
                stream, initial = await _raw_worker(address, transport, hello)
                async with stream:
                    reader = _FrameReader(stream, initial)
                    pongs: list[int] = []
                    for round_, n in enumerate(ns):
                        pubs = [
                            build_publish_frame(NATIVE, 5, "s", "e", [round_, i], OTHERS, 65535) for i in range(3)
                        ]
                        await stream.send(b"".join(pubs) + encode_frame(encode_ping(NATIVE, n)))
                        while len(pongs) <= round_:
                            pong = _pong(await reader.next())
                            if pong is not None:
                                pongs.append(pong)
                        # routed at the pong: queued for (or already written to) worker 2
                        assert b.router.queues[2].routed == 3 * (round_ + 1)
                    assert pongs == ns
                    await rec.wait_for(3 * len(ns))
                    assert [e[2] for e in rec.events] == [[r, i] for r in range(len(ns)) for i in range(3)]
                    # Not a ping after all ("n" a string): the publishes before it are
                    # routed, then the connection ends, as for any bad frame.
                    bad = msgpack.packb({"ping": "7"})
                    pubs = [build_publish_frame(NATIVE, 5, "s", "e", ["last", i], OTHERS, 65535) for i in range(2)]
                    await stream.send(b"".join(pubs) + encode_frame(bad))
                    with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                        for _ in range(100):
                            assert _pong(await reader.next()) is None
                await wait_until(lambda: b.statistics().protocol_errors == 1)
                await rec.wait_for(3 * len(ns) + 2)
                assert [e[2] for e in rec.events[-2:]] == [["last", 0], ["last", 1]]
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_flush_raises_when_the_connection_dies_and_unconfirmed_are_resent(
    address: str, transport: str
) -> None:
    broken: list[BarrierBroken] = []
    async with Client(address, transport=transport, worker_id=0, connect_timeout=2) as c:

        async def barrier() -> None:
            try:
                await c.flush()
            except BarrierBroken as exc:
                broken.append(exc)

        first = Broker(transport=transport, expected_workers=1)
        scope = anyio.CancelScope()

        async def run_first(*, task_status: anyio.abc.TaskStatus[str]) -> None:
            with scope:
                await first.serve(address, task_status=task_status)

        async with anyio.create_task_group() as tg:
            await tg.start(run_first)
            with anyio.fail_after(5):
                await c.wait_ready()
            # From the next connection on, this broker reads nothing: it welcomes, then
            # stalls, so nothing the client writes gets routed (or confirmed).
            first._read_loop = _never_route  # type: ignore[method-assign]
            first.hang_up_all()
            await wait_until(lambda: c.statistics().connects == 2 and c.is_ready)
            await c.publish("s", "kept")
            tg.start_soon(barrier)
            await wait_until(lambda: c.statistics().sent == 1)
            scope.cancel()  # the broker dies before routing it
            await wait_until(lambda: bool(broken))
        assert "ended before it confirmed" in str(broken[0])
        assert c.statistics().unconfirmed == 1
        # The next broker gets it again (at-least-once).
        second = Broker(transport=transport, expected_workers=1)
        rec = Recorder()
        c.subscribe("*", "*", rec)
        async with anyio.create_task_group() as tg:
            await tg.start(second.serve, address)
            assert [e[1] for e in await rec.wait_for(1)] == ["kept"]
            with anyio.fail_after(5):
                await c.flush()  # and confirms it
            tg.cancel_scope.cancel()


async def _never_route(conn: Any, frames: list[bytes]) -> None:
    await anyio.sleep_forever()


# --- default ids ------------------------------------------------------------------------


def test_default_ids_differ_per_client_and_kong_stays_minus_one() -> None:
    a, b = Client("unix:/x", transport="stream"), Client("unix:/x", transport="stream")
    assert a.worker_id != b.worker_id
    assert -a.worker_id // 100 == os.getpid()
    assert Client("unix:/x", transport="stream", profile="kong").worker_id == -1
    assert Client("unix:/x", transport="stream", worker_id=3).worker_id == 3


# --- real processes ---------------------------------------------------------------------

_LISTENER = """
import sys, anyio
import httpbus
async def main():
    got = []
    async with httpbus.connect(sys.argv[1]) as bus:
        bus.subscribe("b", "*", lambda d, e, s, w: got.append(d))
        await bus.wait_ready()
        print("ready", bus.worker_id, flush=True)
        with anyio.fail_after(20):
            while len(got) < int(sys.argv[2]):
                await anyio.sleep(0.01)
    print("got", sorted(got), flush=True)
anyio.run(main)
"""


@pytest.mark.slow
def test_two_default_clients_both_receive_every_broadcast(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "bus.sock")
    address = f"unix:{path}"
    n = 5
    with broker(path) as b:
        cmd = [PY, "-c", _LISTENER, address, str(n)]
        with running(cmd, stdout=subprocess.PIPE) as l1, running(cmd, stdout=subprocess.PIPE) as l2:
            ids = []
            for proc in (l1, l2):
                assert proc.stdout is not None
                ids.append(proc.stdout.readline().split()[1])
            assert ids[0] != ids[1]
            for i in range(n):
                done = subprocess.run(workerbus("publish", address, "b", "e", str(i)), timeout=30)
                assert done.returncode == 0
            for proc in (l1, l2):
                out, _ = proc.communicate(timeout=30)
                assert out.decode().split("\n")[0] == f"got {list(range(n))}"
        b.terminate()
        _, err = b.communicate(timeout=10)
    assert b"replaces the connection" not in err


def _publish(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(workerbus("publish", *args), capture_output=True, text=True, timeout=30)


@pytest.mark.slow
def test_publish_over_the_brokers_limit_fails_with_one_line(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "bus.sock")
    with broker(path, "--max-payload-len", "100"):
        big = '"' + "x" * 300 + '"'
        done = _publish(f"unix:{path}", "big", "e", big)
        assert done.returncode != 0
        assert done.stderr.count("\n") == 1, done.stderr
        assert "over the broker's limit of 100 bytes" in done.stderr
        small = _publish(f"unix:{path}", "small", "e", "1")
        assert small.returncode == 0, small.stderr


@pytest.mark.slow
def test_publish_with_the_wrong_transport_or_profile_names_the_cause(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "bus.sock")
    with broker(path, transport="http"):
        done = _publish(f"unix:{path}", "s", "e", "--transport", "stream")
        assert done.returncode != 0
        assert done.stderr.count("\n") == 1, done.stderr
        assert "http-transport broker" in done.stderr
        done = _publish(f"unix:{path}", "s", "e", "--profile", "kong")
        assert done.returncode != 0
        assert done.stderr.count("\n") == 1, done.stderr
        assert "native-profile broker" in done.stderr
    with broker(path, transport="stream"):
        done = _publish(f"unix:{path}", "s", "e", "--transport", "http", "--timeout", "2")
        assert done.returncode != 0
        assert done.stderr.count("\n") == 1, done.stderr
        assert "stream-transport broker" in done.stderr


@pytest.mark.slow
def test_publish_kong_is_confirmed_by_its_echo(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "bus.sock")
    with broker(path, "--profile", "kong", transport="stream"):
        done = _publish(f"unix:{path}", "s", "e", "1", "--profile", "kong", "--transport", "stream")
        assert done.returncode == 0, done.stderr
        # and a native publish there cannot get a welcome
        done = _publish(f"unix:{path}", "s", "e", "1", "--transport", "stream", "--timeout", "2")
        assert done.returncode != 0
        assert done.stderr.count("\n") == 1, done.stderr
        assert "profile 'kong'" in done.stderr


@pytest.mark.slow
def test_our_client_satisfies_the_kits_strict_serve(sock_dir: str) -> None:
    # serve speaks the extensions too, and reports any byte our client gets wrong.
    path = os.path.join(sock_dir, "serve.sock")
    address = f"unix:{path}"
    cmd = [PY, "-m", "shared.tools.conformance", "serve", address]
    with running(cmd, stdout=subprocess.PIPE) as serve:
        wait_for_socket(path, serve)
        done = _publish(address, "s", "e", '{"k": 1}')
        assert done.returncode == 0, done.stderr
        serve.terminate()
        out, _ = serve.communicate(timeout=10)
    assert serve.returncode == 0, out.decode()


@pytest.mark.anyio
async def test_buffered_publishes_over_the_brokers_limit_are_refused_at_the_welcome(
    address: str, transport: str
) -> None:
    # Published before the client knew the broker (limit 65 535 then): the broker would
    # close the connection on it after every reconnect, so the welcome drops it, counted.
    async with Client(address, transport=transport, worker_id=0) as c:
        rec = Recorder()
        c.subscribe("*", "*", rec)
        c.publish_nowait("s", "big", "x" * 300)
        c.publish_nowait("s", "small", 1)
        b = Broker(transport=transport, max_payload_len=100)
        async with anyio.create_task_group() as tg:
            await tg.start(b.serve, address)
            with anyio.fail_after(5):
                await c.wait_ready()
                await c.flush()
            assert [e[1] for e in await rec.wait_for(1)] == ["small"]
            stats = c.statistics()
            assert (stats.dropped, stats.connects) == (1, 1)
            assert b.statistics().protocol_errors == 0
            tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_welcome_and_first_backlog_leave_in_one_write(
    address: str, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A takeover reconnects every survivor at once; each write can wake a survivor that
    # then takes the new host's CPU, so the welcome control frame, the welcome lifecycle
    # event and what is queued already (here the worker's own "joined") go in one send.
    from shared.stream import FrameStream

    writes: list[bytes] = []
    original = FrameStream.send

    async def counting(self: FrameStream, data: bytes) -> None:
        writes.append(bytes(data))
        await original(self, data)

    monkeypatch.setattr(FrameStream, "send", counting)
    b = Broker(transport=transport, lifecycle_events=True)
    async with anyio.create_task_group() as tg:
        await tg.start(b.serve, address)
        stream, initial = await _raw_worker(address, transport, encode_hello(NATIVE, 5, os.getpid(), ("welcome",)))
        with anyio.fail_after(5):
            frames = await _read_frames(stream, initial, 3)
        await stream.aclose()
        tg.cancel_scope.cancel()
    assert decode_welcome(NATIVE, frames[0]).worker_id == 5
    events: list[Any] = [NATIVE.codec.loads(f) for f in frames[1:]]
    assert [(e["source"], e["event"]) for e in events] == [("workerbus", "welcome"), ("workerbus", "joined")]
    assert writes[0] == b"".join(encode_frame(f) for f in frames)
