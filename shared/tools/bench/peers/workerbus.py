"""workerbus itself: the ``workerbus broker`` command and :class:`shared.client.Client`.

This is what a user runs: the broker is the CLI command in its own process, publishers and
subscribers are ordinary clients. Subscribers register a handler with
:meth:`Client.subscribe`, so the measured latency is publish → handler call.

Two choices keep the comparison with the other peers fair, and are stated in the report:

- Publishers publish with target ``others``. In workerbus every client is a full member of
  the bus, so with target ``all`` a publisher would also receive its own events, which the
  other peers' publishers do not. A publisher has no handler, so with the negotiated
  ``filter`` capability (the default client) it tells the broker after the first event it
  does not handle, and from then on receives nothing (docs/protocol.md §8); whatever it
  did receive is in the CPU totals, not counted as deliveries.
- The broker's per-worker queue limit is raised (``--max-queue-len``) so that a flood never
  drops, as the other peers run without limits (zmq high-water mark 0, redis without an
  output-buffer limit). With the default limit a subscriber that falls more than 10240
  events behind loses the excess, counted and reported.
"""

from __future__ import annotations

import functools
import os
import sys
from contextlib import AsyncExitStack

import anyio

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

__all__ = ["WorkerbusPeer"]

#: Broker queue limit during the benchmark: more than any flood, so nothing is dropped.
BENCH_QUEUE_LEN = 4_000_000


class _BusPublisher:
    def __init__(self, client: Client, stack: AsyncExitStack) -> None:
        self._client = client
        self._stack = stack
        self.publish = functools.partial(client.publish, target=OTHERS)

    async def flush(self) -> None:
        await self._client.flush()

    async def close(self) -> None:
        await self._stack.aclose()


class _BusSubscription:
    def __init__(self, tally: Tally, done: anyio.Event, stack: AsyncExitStack) -> None:
        self._tally = tally
        self._done = done
        self._stack = stack

    async def run(self) -> None:
        await self._done.wait()

    async def close(self) -> None:
        await self._stack.aclose()


class WorkerbusPeer(Peer):
    """workerbus broker command + Client, one process each."""

    def __init__(self, transport: str, backend: str) -> None:
        self.transport = transport
        self.client_backend = backend

    def describe(self) -> str:
        loop = {"asyncio": "asyncio", "uvloop": "asyncio + uvloop", "trio": "trio"}[self.client_backend]
        return (
            f"`workerbus broker --transport {self.transport} --backend {self.client_backend}`, "
            f"Client(transport={self.transport!r}) on {loop}, handlers via subscribe()"
        )

    def unavailable(self) -> str | None:
        if self.client_backend == "uvloop":
            return missing("uvloop", "uvloop", "bench")
        if self.client_backend == "trio":
            return missing("trio", "trio", "trio")
        return None

    def start(self, setup: RunSetup) -> BrokerHandle:
        path = os.path.join(setup.workdir, "bus.sock")
        setup.state["address"] = f"unix:{path}"
        argv = [
            sys.executable, "-m", "shared.tools.cli", "broker",
            "--listen", f"unix:{path}",
            "--transport", self.transport,
            "--backend", self.client_backend,
            "--max-queue-len", str(BENCH_QUEUE_LEN),
            "--log-level", "WARNING",
        ]  # fmt: skip
        proc = spawn(argv)
        try:
            wait_for_socket(path, proc)
        except BaseException:
            stopper(proc)()
            raise
        return BrokerHandle([proc.pid], stopper(proc))

    async def _client(self, setup: RunSetup, worker_id: int) -> tuple[Client, AsyncExitStack]:
        stack = AsyncExitStack()
        client = Client(setup.state["address"], transport=load_transport(self.transport), worker_id=worker_id)
        await stack.enter_async_context(client)
        with anyio.fail_after(15):
            await client.wait_ready()
        return client, stack

    async def publisher(self, setup: RunSetup, index: int) -> Publisher:
        # Worker ids: subscribers 0..N-1, publishers N..N+P-1 (ids must be unique: a second
        # connection with the same id replaces the first).
        client, stack = await self._client(setup, setup.n_subs + index)
        return _BusPublisher(client, stack)

    async def subscriber(self, setup: RunSetup, index: int, tally: Tally) -> Subscription:
        client, stack = await self._client(setup, index)
        done = anyio.Event()
        tally.on_done = done.set
        client.subscribe("*", "*", tally.handler)
        return _BusSubscription(tally, done, stack)
