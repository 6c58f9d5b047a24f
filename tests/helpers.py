"""Small test helpers: bounded waits, event recorders, an in-process broker."""

from __future__ import annotations

import os
import pathlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc

from shared.broker import Broker
from shared.router import QueueStatistics

Record = tuple[str, str, Any, "int | None"]


class ManualClock:
    """A broker clock (``Broker(clock=...)``) that moves only when a test moves it, so a
    timer case (unique timeout, queue grace, frame deadline) takes no real time."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Recorder:
    """A handler that records (source, event, data, wid) and lets tests wait for counts."""

    def __init__(self) -> None:
        self.events: list[Record] = []

    def __call__(self, data: Any, event: str, source: str, wid: int | None) -> None:
        self.events.append((source, event, data, wid))

    def names(self) -> list[str]:
        return [e[1] for e in self.events]

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[Record]:  # noqa: ASYNC109
        await wait_until(lambda: len(self.events) >= count, timeout)
        return self.events


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:  # noqa: ASYNC109
    """Poll ``predicate`` every 5 ms; raise TimeoutError after ``timeout`` seconds.

    Polling is deliberate here: the predicates read counters of the code under test, which
    offers no event to wait on, and the deadline bounds the loop.
    """
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.005)


@asynccontextmanager
async def serving(address: str, **options: Any) -> AsyncIterator[Broker]:
    """``Broker(**options)`` serving on ``address`` while the block runs."""
    broker = Broker(**options)
    async with anyio.create_task_group() as tg:
        await tg.start(broker.serve, address)
        yield broker
        tg.cancel_scope.cancel()


def queue_of(broker: Broker, worker_id: int) -> QueueStatistics:
    """The statistics of ``worker_id``'s queue (there must be exactly one)."""
    (queue,) = [q for q in broker.statistics().router.queues if q.worker_id == worker_id]
    return queue


def kong_captures() -> pathlib.Path:
    """Where the captures of the real lua-resty-events live, if anywhere.

    They ship beside the checkout (``../shared/vectors/kong``) only on the team's machines and
    in CI; ``WORKERBUS_KONG_CAPTURES`` overrides. Tests using them skip when the folder is
    missing.
    """
    override = os.environ.get("WORKERBUS_KONG_CAPTURES")
    if override:
        return pathlib.Path(override)
    beside = pathlib.Path(__file__).resolve().parents[2] / "shared" / "vectors" / "kong"
    return beside if beside.is_dir() else pathlib.Path("/work/shared/vectors/kong")


async def serve_unix(
    path: str,
    handler: Callable[[Any], Any],
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """A fake broker's listener: accept on ``path`` and give each connection, guarded as
    the bus guards its own (``shared.sockets.guard``), to ``handler``, until cancelled.

    It accepts as the broker does (``shared.listener.accept_forever``), not through
    ``anyio.create_unix_listener``: anyio's ``accept``, and the raw socket streams it hands
    out, make asyncio log an ``InvalidStateError`` when the task is cancelled in the loop
    turn in which the socket became readable, and the test then fails on a race (a client
    reconnecting as the test ends).
    """
    import socket

    from shared.listener import accept_forever
    from shared.sockets import guard

    async def guarded(stream: anyio.abc.SocketStream) -> None:
        await handler(await guard(stream))

    def out_of_files(exc: OSError) -> None:
        raise exc  # a test's fake broker does not wait for descriptors: fail loudly

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(16)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    async with await anyio.abc.SocketListener.from_socket(sock) as listener, anyio.create_task_group() as tg:
        task_status.started()
        await accept_forever(listener, guarded, tg, out_of_files)
