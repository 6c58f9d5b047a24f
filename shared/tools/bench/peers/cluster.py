"""Cross-node fan-out: the cluster bridge against its engine used directly (docs/cluster.md).

Two kinds of scenario per engine (NATS: Debian's ``nats-server`` on loopback TCP; Redis:
Debian's ``redis-server`` on a Unix socket), run by the same harness, the same forked
publisher and subscriber processes and the same per-event tally as every other peer:

- ``cluster-<engine>-direct``: the engine alone. Publishers and subscribers are nats-py
  (or redis-py) clients of the engine; no workerbus anywhere.
- ``cluster-<engine>-bridge``: two workerbus nodes (``workerbus broker --bridge URL``,
  nodes ``a`` and ``b``) joined through that same engine. Publishers are workerbus clients
  of node ``a`` publishing with ``scope="cluster"`` (target ``others``, as in the
  single-host scenario); subscribers are workerbus clients of node ``b``, so every measured
  event crosses client → broker a → engine → broker b → client.

Fairness between the two (stated in the report): both sides batch the same way towards the
engine. NATS: nats-py's own write buffer in both cases (the direct publisher's ``flush`` is
nats-py's ``flush()``, one PING/PONG, at the end of every pacing tick; the bridge relies on
the same buffer and nats-py's flusher task). Redis: PUBLISH commands pipelined, up to 512
per round trip, in both cases (the direct publisher sends its pipeline at every pacing tick
and every 512 events; the bridge sends whatever its outbox holds, up to 512, per pipeline).
Both engines run without output limits (redis: no pub/sub buffer limit; the brokers: a
queue limit and bridge buffer above any flood), so a flood is buffered, never dropped.

The latency test of these scenarios runs at 5 000 events/s (:attr:`Peer.lat_rate`), the
rate of the issue's target, whatever ``--rate`` says for the single-host scenarios.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from typing import Any

import anyio
import msgpack

from shared.client import Client
from shared.messages import OTHERS
from shared.tools.bench.tally import Tally
from shared.transportnames import load_transport

from .base import (
    BrokerHandle,
    Peer,
    Publisher,
    RunSetup,
    Subscription,
    missing,
    spawn,
    stopper,
    wait_for_socket,
)
from .redispubsub import RedisPublisher, RedisSubscription
from .workerbus import BENCH_QUEUE_LEN

__all__ = ["CLUSTER_RATE", "ClusterBridgePeer", "ClusterDirectPeer", "ENGINES"]

#: events/s of the cluster latency test (the issue's target is stated at this rate)
CLUSTER_RATE = 5000.0
#: PUBLISH commands per Redis round trip, on both sides (the bridge's batch, host.py)
_PIPELINE = 512
#: the direct scenarios' subject / channel
_SUBJECT = "bench.direct"
ENGINES = ("nats", "redis")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"engine exited early with status {proc.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.01)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")


def _engine_unavailable(engine: str) -> str | None:
    if engine == "nats":
        if shutil.which("nats-server") is None:
            return "nats-server is not installed (apt-get install nats-server)"
        return missing("nats", "nats-py", "nats")
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (apt-get install redis-server)"
    return missing("redis.asyncio", "redis-py", "redis")


def _start_engine(engine: str, setup: RunSetup) -> subprocess.Popen[bytes]:
    """Start the engine; leave its URL in ``setup.state["url"]``."""
    if engine == "nats":
        exe = shutil.which("nats-server")
        assert exe is not None
        port = _free_port()
        proc = spawn([exe, "-a", "127.0.0.1", "-p", str(port)], stderr=subprocess.DEVNULL)
        try:
            _wait_port(port, proc)
        except BaseException:
            stopper(proc)()
            raise
        setup.state["url"] = f"nats://127.0.0.1:{port}"
        return proc
    exe = shutil.which("redis-server")
    assert exe is not None
    path = os.path.join(setup.workdir, "redis.sock")
    argv = [
        exe, "--port", "0", "--unixsocket", path, "--unixsocketperm", "700",
        "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", setup.workdir,
        "--client-output-buffer-limit", "pubsub 0 0 0", "--loglevel", "warning",
    ]  # fmt: skip
    proc = spawn(argv, stderr=subprocess.DEVNULL)
    try:
        wait_for_socket(path, proc)
    except BaseException:
        stopper(proc)()
        raise
    setup.state["url"] = f"redis+unix://{path}"
    setup.state["redis_path"] = path
    return proc


def _stop_all(stops: list[Any]) -> Any:
    def stop() -> None:
        for s in reversed(stops):  # brokers first, then the engine
            s()

    return stop


# --- the engine used directly ----------------------------------------------------------------


class _NatsPublisher:
    def __init__(self, nc: Any) -> None:
        self._nc = nc
        self._pack = msgpack.Packer().pack

    async def publish(self, source: str, event: str, data: Any) -> None:
        await self._nc.publish(_SUBJECT, self._pack({"source": source, "event": event, "data": data}))

    async def flush(self) -> None:
        await self._nc.flush()

    async def close(self) -> None:
        await self._nc.close()


class _NatsSubscription:
    def __init__(self, nc: Any, done: anyio.Event) -> None:
        self._nc = nc
        self._done = done

    async def run(self) -> None:
        await self._done.wait()

    async def close(self) -> None:
        await self._nc.close()


class ClusterDirectPeer(Peer):
    """The engine used directly by the same processes (baseline of the cluster bridge)."""

    lat_rate = CLUSTER_RATE

    def __init__(self, engine: str) -> None:
        self.engine = engine

    def describe(self) -> str:
        if self.engine == "nats":
            return "Debian `nats-server` on loopback TCP, nats-py publishers and subscribers (no workerbus)"
        return (
            "Debian `redis-server` on a Unix socket, redis-py asyncio publishers (PUBLISH "
            f"pipelined, up to {_PIPELINE}) and subscribers (no workerbus)"
        )

    def unavailable(self) -> str | None:
        return _engine_unavailable(self.engine)

    def start(self, setup: RunSetup) -> BrokerHandle:
        proc = _start_engine(self.engine, setup)
        return BrokerHandle([proc.pid], stopper(proc))

    async def publisher(self, setup: RunSetup, index: int) -> Publisher:
        if self.engine == "nats":
            import nats

            return _NatsPublisher(await nats.connect(setup.state["url"]))
        import redis.asyncio

        return RedisPublisher(redis.asyncio.Redis(unix_socket_path=setup.state["redis_path"]), _SUBJECT, _PIPELINE)

    async def subscriber(self, setup: RunSetup, index: int, tally: Tally) -> Subscription:
        if self.engine == "nats":
            import nats

            nc = await nats.connect(setup.state["url"])
            done = anyio.Event()
            tally.on_done = done.set
            unpack = msgpack.unpackb

            async def got(m: Any) -> None:
                msg = unpack(m.data)
                tally.take([(msg["source"], msg["event"], msg["data"])])

            await nc.subscribe(_SUBJECT, cb=got, pending_msgs_limit=10_000_000, pending_bytes_limit=-1)
            await nc.flush()  # the server has the subscription
            return _NatsSubscription(nc, done)
        import redis.asyncio

        client = redis.asyncio.Redis(unix_socket_path=setup.state["redis_path"])
        pubsub = client.pubsub()
        await pubsub.subscribe(_SUBJECT)
        for _ in range(100):  # the server confirms the subscription with a message
            m = await pubsub.get_message(timeout=5.0)
            if m is not None and m["type"] == "subscribe":
                break
        else:
            raise RuntimeError("redis never confirmed the subscription")
        return RedisSubscription(client, pubsub, tally)


# --- two workerbus nodes bridged through the engine --------------------------------------------


class _BusPublisher:
    def __init__(self, client: Client, stack: AsyncExitStack) -> None:
        self._client = client
        self._stack = stack
        self.publish = functools.partial(client.publish, target=OTHERS, scope="cluster")

    async def flush(self) -> None:
        await self._client.flush()

    async def close(self) -> None:
        await self._stack.aclose()


class _BusSubscription:
    def __init__(self, done: anyio.Event, stack: AsyncExitStack) -> None:
        self._done = done
        self._stack = stack

    async def run(self) -> None:
        await self._done.wait()

    async def close(self) -> None:
        await self._stack.aclose()


class ClusterBridgePeer(Peer):
    """Two workerbus nodes bridged through the engine: publishers on a, subscribers on b."""

    lat_rate = CLUSTER_RATE

    def __init__(self, engine: str, broker_backend: str = "asyncio") -> None:
        self.engine = engine
        self.broker_backend = broker_backend

    def describe(self) -> str:
        where = "nats-server on loopback TCP" if self.engine == "nats" else "redis-server on a Unix socket"
        return (
            f"`workerbus broker --bridge` ×2 ({self.broker_backend}) through {where}: Client publishers "
            "on node a (scope cluster, target others), Client subscribers on node b"
        )

    def unavailable(self) -> str | None:
        why = _engine_unavailable(self.engine)
        if why is None and self.broker_backend == "trio":
            why = missing("trio", "trio", "trio")
        return why

    def start(self, setup: RunSetup) -> BrokerHandle:
        engine = _start_engine(self.engine, setup)
        stops = [stopper(engine)]
        pids = [engine.pid]
        try:
            for node in ("a", "b"):
                path = os.path.join(setup.workdir, f"{node}.sock")
                setup.state[node] = f"unix:{path}"
                argv = [
                    sys.executable, "-m", "shared.tools.cli", "broker",
                    "--listen", f"unix:{path}",
                    "--transport", "stream", "--backend", self.broker_backend,
                    "--max-queue-len", str(BENCH_QUEUE_LEN),
                    "--bridge", setup.state["url"], "--node", node,
                    "--bridge-buffer", str(BENCH_QUEUE_LEN),
                    "--log-level", "WARNING",
                ]  # fmt: skip
                proc = spawn(argv)
                stops.append(stopper(proc))
                pids.append(proc.pid)
                wait_for_socket(path, proc)
        except BaseException:
            _stop_all(stops)()
            raise
        # The bridges connect to the engine on their own; the harness's sync probe (repeated
        # until every subscriber saw one) covers the time until both are connected.
        return BrokerHandle(pids, _stop_all(stops))

    async def _client(self, address: str, worker_id: int) -> tuple[Client, AsyncExitStack]:
        stack = AsyncExitStack()
        client = Client(address, transport=load_transport("stream"), worker_id=worker_id)
        await stack.enter_async_context(client)
        with anyio.fail_after(15):
            await client.wait_ready()
        return client, stack

    async def publisher(self, setup: RunSetup, index: int) -> Publisher:
        client, stack = await self._client(setup.state["a"], index)
        return _BusPublisher(client, stack)

    async def subscriber(self, setup: RunSetup, index: int, tally: Tally) -> Subscription:
        client, stack = await self._client(setup.state["b"], index)
        done = anyio.Event()
        tally.on_done = done.set
        client.subscribe("*", "*", tally.handler)
        return _BusSubscription(done, stack)
