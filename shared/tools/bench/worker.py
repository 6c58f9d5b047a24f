"""The bodies of the publisher and subscriber processes of one fan-out run.

The harness talks to each worker over a pipe: the worker reports ``ready`` (with its pid,
so its CPU can be read from /proc), waits for ``sync``/``go``/``exit``, and reports
``done`` with its counts. Async workers wait for the pipe through the event loop
(:func:`anyio.wait_readable`), so a client keeps reading and writing its socket meanwhile.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import time
import traceback
from collections.abc import Awaitable, Callable, MutableSequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import anyio

from .peers.base import SOURCE, Peer, RunSetup
from .tally import Tally

__all__ = ["Plan", "publisher_main", "run_on", "subscriber_main"]

#: Seconds between sync probes while waiting for every subscriber to be reachable.
_PROBE_EVERY = 0.005
#: Pacing tick of the fixed-rate test: wake, publish what is due, flush.
_PACE = 0.001


@dataclass(frozen=True)
class Plan:
    """What one publisher does once told to go."""

    count: int
    #: events/s for this publisher; 0 = flood (as fast as it can)
    rate: float
    probe_timeout: float = 20.0


def run_on(backend: str, func: Callable[..., Awaitable[None]], *args: Any) -> None:
    """Run ``func(*args)`` on an anyio backend: ``asyncio``, ``uvloop`` or ``trio``."""
    if backend == "uvloop":
        anyio.run(func, *args, backend="asyncio", backend_options={"use_uvloop": True})
    else:
        anyio.run(func, *args, backend=backend)


async def _control(conn: Connection) -> Any:
    await anyio.wait_readable(conn.fileno())
    return conn.recv()


def _guard(conn: Connection, body: Callable[[], None]) -> None:
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # kill -USR2 PID: dump stacks
    try:
        body()
    except BaseException:  # noqa: BLE001 - whatever ends a worker is reported to the harness
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
    finally:
        os._exit(0)  # forked from the harness: skip its atexit handlers and finalizers


# --- subscribers ---------------------------------------------------------------------------


def subscriber_main(
    peer: Peer,
    setup: RunSetup,
    index: int,
    conn: Connection,
    seen: MutableSequence[int],
    want_latency: bool,
) -> None:
    tally = Tally(index, setup.n_pubs, seen, want_latency=want_latency)
    if peer.is_sync:
        _guard(conn, lambda: _subscriber_sync(peer, setup, index, conn, tally))
    else:
        _guard(conn, lambda: run_on(peer.client_backend, _subscriber_async, peer, setup, index, conn, tally))


def _done(tally: Tally) -> tuple[str, int, int, bytes]:
    lat = tally.latencies.tobytes() if tally.latencies is not None else b""
    return ("done", tally.count, tally.last_ns, lat)


async def _subscriber_async(peer: Peer, setup: RunSetup, index: int, conn: Connection, tally: Tally) -> None:
    sub = await peer.subscriber(setup, index, tally)
    conn.send(("ready", os.getpid()))
    await sub.run()
    conn.send(_done(tally))
    await _control(conn)  # "exit", once the harness has read our CPU time
    await sub.close()


def _subscriber_sync(peer: Peer, setup: RunSetup, index: int, conn: Connection, tally: Tally) -> None:
    sub = peer.subscriber_sync(setup, index, tally)
    conn.send(("ready", os.getpid()))
    sub.run()
    conn.send(_done(tally))
    conn.recv()
    sub.close()


# --- publishers ----------------------------------------------------------------------------


def publisher_main(
    peer: Peer,
    setup: RunSetup,
    index: int,
    conn: Connection,
    seen: MutableSequence[int],
    plan: Plan,
) -> None:
    if peer.is_sync:
        _guard(conn, lambda: _publisher_sync(peer, setup, index, conn, seen, plan))
    else:
        _guard(
            conn,
            lambda: run_on(peer.client_backend, _publisher_async, peer, setup, index, conn, seen, plan),
        )


def _reached_all(seen: MutableSequence[int], index: int, n_subs: int, n_pubs: int) -> bool:
    return all(seen[s * n_pubs + index] for s in range(n_subs))


async def _publisher_async(
    peer: Peer, setup: RunSetup, index: int, conn: Connection, seen: MutableSequence[int], plan: Plan
) -> None:
    pub = await peer.publisher(setup, index)
    conn.send(("ready", os.getpid()))
    await _control(conn)  # "sync"
    # Probe until every subscriber has seen one of our events: nothing measured is lost to
    # a subscription that is not active yet (ZeroMQ's slow joiner, a hello in flight).
    deadline = time.monotonic() + plan.probe_timeout
    while not _reached_all(seen, index, setup.n_subs, setup.n_pubs):
        if time.monotonic() > deadline:
            raise RuntimeError("the sync probe did not reach every subscriber in time")
        await pub.publish(SOURCE, "sync", {"p": index})
        await pub.flush()
        await anyio.sleep(_PROBE_EVERY)
    conn.send(("synced",))
    await _control(conn)  # "go"
    now = time.monotonic_ns
    publish = pub.publish
    count = plan.count
    first = now()
    if plan.rate <= 0:
        for i in range(count):
            await publish(SOURCE, "tick", {"i": i, "ts": now()})
        await pub.flush()
    else:
        per_ns = plan.rate / 1e9
        i = 0
        while i < count:
            due = min(count, int((now() - first) * per_ns) + 1)
            while i < due:
                await publish(SOURCE, "tick", {"i": i, "ts": now()})
                i += 1
            await pub.flush()
            await anyio.sleep(_PACE)
    last = now()
    await publish(SOURCE, "end", {"p": index})
    await pub.flush()
    conn.send(("done", first, last))
    await _control(conn)  # "exit"
    await pub.close()


def _publisher_sync(
    peer: Peer, setup: RunSetup, index: int, conn: Connection, seen: MutableSequence[int], plan: Plan
) -> None:
    pub = peer.publisher_sync(setup, index)
    conn.send(("ready", os.getpid()))
    conn.recv()
    deadline = time.monotonic() + plan.probe_timeout
    while not _reached_all(seen, index, setup.n_subs, setup.n_pubs):
        if time.monotonic() > deadline:
            raise RuntimeError("the sync probe did not reach every subscriber in time")
        pub.publish(SOURCE, "sync", {"p": index})
        pub.flush()
        time.sleep(_PROBE_EVERY)
    conn.send(("synced",))
    conn.recv()
    now = time.monotonic_ns
    publish = pub.publish
    count = plan.count
    first = now()
    if plan.rate <= 0:
        for i in range(count):
            publish(SOURCE, "tick", {"i": i, "ts": now()})
        pub.flush()
    else:
        per_ns = plan.rate / 1e9
        i = 0
        while i < count:
            due = min(count, int((now() - first) * per_ns) + 1)
            while i < due:
                publish(SOURCE, "tick", {"i": i, "ts": now()})
                i += 1
            pub.flush()
            time.sleep(_PACE)
    last = now()
    publish(SOURCE, "end", {"p": index})
    pub.flush()
    conn.send(("done", first, last))
    conn.recv()
    pub.close()
