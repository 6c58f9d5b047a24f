"""The cluster bridge's pure parts: the scope on the wire, envelopes, gap counting."""

from __future__ import annotations

import socket
import subprocess
import sys
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from shared.bridge import Envelope, GapCheck, decode_envelope, encode_envelope
from shared.bridges import make_bridge
from shared.broker import Broker
from shared.codec import MsgpackCodec
from shared.errors import RemoteProtocolError
from shared.messages import (
    ALL,
    NodeWid,
    Target,
    TargetKind,
    decode_event,
    decode_event_batch,
    decode_publish,
    decode_publish_batch,
    encode_publish,
    parse_target,
)
from shared.profile import KONG, NATIVE
from shared.router import Router


@pytest.mark.parametrize("target", ["all", "others", "unique:k"])
def test_cluster_scope_round_trips_in_the_publish_spec(target: str) -> None:
    t = parse_target(target).with_scope("cluster")
    payload = encode_publish(NATIVE, t, b"\x80")
    decoded: Any = MsgpackCodec().loads(payload)
    assert decoded["spec"]["scope"] == "cluster"
    back, data = decode_publish(NATIVE, payload)
    assert back == t and back.cluster and data == b"\x80"
    runs, error = decode_publish_batch(NATIVE, [payload])
    assert error is None and runs[0][0].cluster


def test_local_publishes_are_byte_identical_to_before() -> None:
    # the host-local fast path is untouched: no scope key at all
    assert encode_publish(NATIVE, ALL, b"\x80") == b"\x82\xa4spec\x80\xa4data\xc4\x01\x80"
    assert parse_target("all").with_scope("local") is ALL


@pytest.mark.parametrize("target", ["current", "worker:3", 3])
def test_no_cluster_scope_for_current_or_one_worker(target: str | int) -> None:
    with pytest.raises(ValueError, match="no cluster scope"):
        parse_target(target).with_scope("cluster")
    with pytest.raises(ValueError, match="invalid scope"):
        parse_target("all").with_scope("planet")


@pytest.mark.parametrize(
    "spec",
    [{"scope": "cluster", "worker": 1}, {"scope": "galaxy"}, {"scope": True}, {"scope": "cluster", "x": 1}],
)
def test_bad_scopes_are_protocol_errors(spec: dict[str, object]) -> None:
    payload = MsgpackCodec().dumps({"spec": spec, "data": b"\x80"})
    with pytest.raises(RemoteProtocolError):
        decode_publish(NATIVE, payload)


def test_kong_profile_has_no_scope() -> None:
    with pytest.raises(ValueError):
        encode_publish(KONG, ALL.with_scope("cluster"), b"x")


def test_without_a_bridge_a_broker_is_a_one_node_cluster() -> None:
    router = Router()
    router.attach(0)
    unique = Target(TargetKind.UNIQUE, key="k").with_scope("cluster")
    assert router.route(0, unique, b"\x00\x01x") == 1
    router.defer_cluster_unique = True  # what a bridge sets: the claim decides
    assert router.route(0, Target(TargetKind.UNIQUE, key="j").with_scope("cluster"), b"\x00\x01x") == 0


def test_envelopes_round_trip_and_garbage_is_refused() -> None:
    env = Envelope("e", "n1", "g", 7, "others", b"\x81\xa1a\x01")
    assert decode_envelope(encode_envelope(env)) == env
    marker = Envelope("s", "n1", "g", 9)
    assert decode_envelope(encode_envelope(marker)) == marker
    for junk in (b"", b"\xc1", MsgpackCodec().dumps([1]), MsgpackCodec().dumps({"k": "e", "n": "x", "g": "g", "s": True})):
        assert decode_envelope(junk) is None


def test_gaps_are_counted_once_per_stream_and_generation() -> None:
    g = GapCheck()
    assert g.step("a", "g1", 1, marker=False) == 0  # baseline
    assert g.step("a", "g1", 2, marker=False) == 0
    assert g.step("a", "g1", 5, marker=False) == 2  # 3 and 4 missing
    assert g.step("a", "g1", 5, marker=False) == -1  # a duplicate: not delivered twice
    assert g.step("a", "g1", 8, marker=True) == 3  # "my latest is 8": 6, 7, 8 missing
    assert g.step("a", "g2", 1, marker=False) == 0  # a restarted broker: new baseline
    assert g.step("b", "h", 4, marker=False) == 0  # another node: its own stream
    assert g.lost == 5


def test_remote_events_say_which_node() -> None:
    codec = MsgpackCodec()
    payload = codec.dumps({"source": "s", "event": "e", "wid": 3, "node": "n2"})
    ev = decode_event(NATIVE, payload)
    assert ev.node == "n2" and ev.wid == 3 and isinstance(ev.wid, NodeWid) and ev.wid.node == "n2"
    batch, _ = decode_event_batch(NATIVE, [payload, codec.dumps({"source": "s", "event": "e", "wid": 3})])
    assert getattr(batch[0][3], "node", None) == "n2" and getattr(batch[1][3], "node", None) is None


def test_make_bridge_refuses_bad_urls_and_names() -> None:
    with pytest.raises(ValueError, match="expected nats://"):
        make_bridge("http://x")
    with pytest.raises(ValueError, match="cluster name"):
        make_bridge("nats://127.0.0.1:1", cluster="a.b")
    assert make_bridge("redis://:secret@127.0.0.1:6379/0", node="n").description == "redis://127.0.0.1:6379/0"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shared.tools.cli", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--bridge", "http://127.0.0.1:1"), "expected nats://"),
        (("--node", "a"), "--node needs --bridge"),
        (("--bridge", "nats://127.0.0.1:1", "--cluster", "a.b"), "cluster name"),
        (("--bridge", "nats://127.0.0.1:1", "--profile", "kong"), "needs the native profile"),
    ],
)
def test_broker_bridge_errors_are_one_line(args: tuple[str, ...], message: str, sock_dir: str) -> None:
    out = _cli("broker", "--listen", f"unix:{sock_dir}/b.sock", *args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr


def test_publish_refuses_a_cluster_scope_for_one_worker(sock_dir: str) -> None:
    out = _cli("publish", f"unix:{sock_dir}/none.sock", "s", "e", "--scope", "cluster", "--target", "worker:1", "--timeout", "1")
    assert out.returncode == 2 and "no cluster scope" in out.stderr and "reach" not in out.stderr


def test_runs_of_events_travel_in_one_envelope() -> None:
    events = (b"\x81\xa1a\x01", b"\x81\xa1a\x02")
    env = Envelope("b", "n1", "g", 11, events=events)
    assert decode_envelope(encode_envelope(env)) == env
    for junk in ({"k": "b", "n": "x", "g": "g", "s": 1, "e": []}, {"k": "b", "n": "x", "g": "g", "s": 1, "e": [1]}):
        assert decode_envelope(MsgpackCodec().dumps(junk)) is None


def test_runs_count_gaps_and_skip_what_was_seen() -> None:
    g = GapCheck()
    assert g.step_run("a", "g1", 1, 3) == (0, 0)  # baseline: 1..3
    assert g.step_run("a", "g1", 4, 2) == (0, 0)  # 4, 5
    assert g.step_run("a", "g1", 4, 4) == (0, 2)  # a retried run: 4, 5 again, 6, 7 new
    assert g.step_run("a", "g1", 10, 1) == (2, 0)  # 8, 9 missing
    assert g.step_run("a", "g1", 9, 2) == (0, 2)  # nothing new
    assert g.step(("a"), "g1", 12, marker=True) == 2  # 11, 12 missing
    assert g.step_run("a", "g2", 1, 1) == (0, 0)  # a restarted broker: new baseline
    assert g.lost == 4


@pytest.mark.parametrize(
    "event",
    [
        {"source": "s", "event": "e", "data": {"x": [1, 2]}, "wid": 3},
        {"source": "s", "event": "e", "data": None, "wid": 3, "sb": 7},  # embedded numbers go
        {"source": "s", "event": "e", "wid": 3, "node": "forged"},  # the bridge's name wins
        {f"k{i}": i for i in range(20)},  # a map 16 header
    ],
)
def test_the_node_is_added_without_decoding_in_the_common_case(event: dict[str, object]) -> None:
    from shared.bridge import tag_node

    codec = MsgpackCodec()
    tagged = codec.loads(tag_node(codec.dumps(event), "n2"))
    want = {k: v for k, v in event.items() if k not in ("sb", "sw")}
    want["node"] = "n2"
    assert tagged == want


@pytest.mark.parametrize("kind", ["nats", "redis"])
def test_a_connect_cut_short_leaves_no_socket_open(kind: str) -> None:
    # The bridge stops (or times out) while the engine client is still connecting: the
    # TCP connection it has opened must be closed by the engine's close(), not left for
    # the garbage collector to find after the engine's loop is gone (a ResourceWarning in
    # whichever test runs next; seen in CI with nats-py).
    from shared.bridges.nats import NatsEngine
    from shared.bridges.redis import RedisEngine

    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5.0)
        port = listener.getsockname()[1]

        async def main() -> socket.socket:
            engine = NatsEngine(f"nats://127.0.0.1:{port}", "c") if kind == "nats" else RedisEngine(f"redis://127.0.0.1:{port}", "c")
            async with anyio.create_task_group() as tg:
                tg.start_soon(engine.connect)  # the server never answers: it waits
                conn, _ = await anyio.to_thread.run_sync(listener.accept)
                tg.cancel_scope.cancel()
            await engine.close()
            return conn

        conn = anyio.run(main, backend="asyncio")
        with conn:
            conn.settimeout(5.0)
            # What the client sent before it gave up (Redis: HELLO), then b"": it closed
            # its end (a timeout would raise instead).
            closed = any(conn.recv(100) == b"" for _ in range(100))
            assert closed


class _SendsAlwaysFail:
    """An engine that connects, then fails every send (the sync marker sent right after
    connecting included): each session ends at once."""

    description = "fake://always-failing"

    async def connect(self) -> None:
        pass

    async def subscribe(self, on_message: Any) -> None:
        pass

    async def publish(self, payload: bytes) -> None:
        raise ConnectionError("this send always fails")

    async def publish_many(self, payloads: list[bytes]) -> None:
        raise ConnectionError("this send always fails")

    async def claim(self, key: str, ttl: float) -> bool:
        raise ConnectionError("this send always fails")

    async def wait_closed(self) -> BaseException | None:
        await anyio.sleep_forever()
        return None

    async def close(self) -> None:
        pass


@pytest.mark.anyio
async def test_sessions_that_break_at_once_back_off_like_failed_connects(
    sock_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before session 5, a send the engine always failed (seen: claims on a NATS server
    # without JetStream) reconnected with no pause: ~1000 WARNING lines a second.
    from shared.bridge import Bridge
    from shared.bridges import host

    from .helpers import wait_until

    waits: list[int] = []

    async def record(failures: int) -> None:
        waits.append(failures)
        await anyio.lowlevel.checkpoint()

    monkeypatch.setattr(host, "_back_off", record)
    bridge = Bridge(_SendsAlwaysFail, node="n", description=_SendsAlwaysFail.description)
    broker = Broker(transport="stream", bridge=bridge)
    async with anyio.create_task_group() as tg:
        await tg.start(broker.serve, f"unix:{sock_dir}/b.sock")
        await wait_until(lambda: len(waits) >= 5, 10.0)
        tg.cancel_scope.cancel()
    assert waits[:5] == [1, 2, 3, 4, 5]  # the backoff grows; nothing reset it
    assert bridge.connects >= 5


@pytest.mark.anyio
async def test_a_quiet_redis_link_stays_up_on_keepalive_pings(
    monkeypatch: pytest.MonkeyPatch, anyio_backend: str
) -> None:
    # The Redis engine pings over its subscription after KEEPALIVE seconds of silence and
    # gives the link up after three spans with nothing heard (a partition:
    # tests/test_cluster_partition.py). A live but quiet server answers every ping, so the
    # session must outlast many such spans.
    if anyio_backend != "asyncio":
        pytest.skip("redis-py runs on asyncio (the bridge's engine host)")
    import shared.bridges.redis as redis_engine
    from tests.cluster_kit import cluster_dir, engine

    monkeypatch.setattr(redis_engine, "KEEPALIVE", 0.05)
    with cluster_dir() as workdir, engine("redis", workdir) as eng:
        e = redis_engine.RedisEngine(eng.url, "c")
        await e.connect()
        try:
            await e.subscribe(lambda _: None)
            with anyio.move_on_after(1.0):  # 20 spans, the limit is 3 without an answer
                ended = await e.wait_closed()
                raise AssertionError(f"the quiet session ended: {ended}")
        finally:
            await e.close()
