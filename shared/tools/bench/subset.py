"""The "subset" scenario of ``workerbus bench`` (issue #14): workers that handle a part.

``subs`` workers, each handling one of ``sources`` sources, and ``pubs`` publishers
flooding ``events`` events to ``all``, cycling through the sources; plus one publish-only
process and one client that handles everything. The same shape runs on two buses:

- workerbus (:func:`run`): a stream broker and :class:`shared.client.Client` everywhere;
  each worker subscribes to its source, so with the filter (the default) the broker
  sends it only those events; the publish-only client has no handlers and receives
  nothing. ``Client(filtered=False)`` runs it without the filter.
- limit-raw-uds (:func:`run_raw`): the minimal broker of ``peers/rawuds_broker.py`` and
  its clients. It cannot filter: every worker receives every event, decodes it, and
  handles those of its source; a process that only publishes opens no subscriber
  connection.

Both count *handled* events the same way (a worker's handler ran for a ``tick`` of its
source; the everything client's for every ``tick``) and measure the CPU of every process
(broker, workers, publishers, the two extra clients) from "go" until every worker has
handled its share. :func:`run_subset` alternates the two, ``reps`` times, and reports the
medians and the ratio of CPU per million handled events.
"""

from __future__ import annotations

import asyncio  # noqa: TID251 - the limit-raw-uds side is plain asyncio, like its peer
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import anyio

import streambus

from . import procfs
from .fanout import median_of
from .peers.base import RunSetup
from .peers.rawuds import RawUdsPeer, open_publisher, open_subscriber, receive_events
from .worker import _guard

__all__ = ["DESCRIPTION", "SUBSET", "run", "run_raw", "run_subset"]

#: The issue's shape: 16 workers, 4 publishers, 8 sources, each worker on one source.
SUBSET = {"subs": 16, "pubs": 4, "sources": 8}
DESCRIPTION = (
    "16 workers each handling 1 of 8 sources, 4 publishers, a publish-only client: workerbus "
    "stream/asyncio with filters against limit-raw-uds (every event to every worker), same shape"
)

_DEADLINE = 120.0
#: What a client handles: None (publish-only), EVERYTHING, or one source's name.
EVERYTHING = "*"


@dataclass(frozen=True)
class _Shape:
    events: int
    pubs: int
    sources: int


# --- the workerbus side --------------------------------------------------------------------


def _wb_broker(address: str, queue_len: int, pipe: Connection) -> None:
    async def main() -> None:
        # Queues that hold a whole run: a flood must not overflow the slowest client (the
        # one that takes everything), so every run handles every event.
        b = streambus.Broker(max_queue_len=queue_len)
        async with anyio.create_task_group() as tg:
            await tg.start(b.serve, address)
            pipe.send(("ready", os.getpid()))
            await anyio.to_thread.run_sync(pipe.recv)
            stats = b.statistics().router
            pipe.send(("stats", {"broker_sent": stats.sent, "broker_filtered": stats.filtered,
                                 "broker_dropped": stats.dropped}))  # fmt: skip
            # (served until the clients are gone: a client that outlives its broker warns)
            await anyio.to_thread.run_sync(pipe.recv)
            tg.cancel_scope.cancel()

    _guard(pipe, lambda: anyio.run(main))


def _wb_client(filtered: bool, address: str, wid: int, handles: str | None, expect: int, shape: _Shape,
               pipe: Connection) -> None:  # fmt: skip
    async def main() -> None:
        handled = 0
        done = anyio.Event()

        def handler(data: Any, event: str, source: str, w: int | None) -> None:
            nonlocal handled
            if source != "workerbus" and event != "warm":
                handled += 1
                if handled >= expect:
                    done.set()

        async with streambus.connect(address, worker_id=wid, filtered=filtered) as c:
            if handles is not None:
                c.subscribe(handles, "*", handler)
            await c.wait_ready()
            pipe.send(("ready", os.getpid()))
            await anyio.to_thread.run_sync(pipe.recv)  # "sync": warm-up seen, filters set
            await c.flush()
            pipe.send(("flushed",))
            if expect:
                with anyio.fail_after(_DEADLINE):
                    await done.wait()
            pipe.send(("done", handled, None))
            await anyio.to_thread.run_sync(pipe.recv)

    _guard(pipe, lambda: anyio.run(main))


def _wb_publisher(filtered: bool, address: str, wid: int, count: int, sources: int, pipe: Connection) -> None:
    async def main() -> None:
        async with streambus.connect(address, worker_id=wid, filtered=filtered) as c:
            await c.wait_ready()
            pipe.send(("ready", os.getpid()))
            await anyio.to_thread.run_sync(pipe.recv)  # warm up: one event per source
            for s in range(sources):
                await c.publish(f"s{s}", "warm")
            await c.flush()
            pipe.send(("warmed",))
            await anyio.to_thread.run_sync(pipe.recv)  # go
            for i in range(count):
                await c.publish(f"s{i % sources}", "tick", i)
            await c.flush()
            pipe.send(("done",))
            await anyio.to_thread.run_sync(pipe.recv)

    _guard(pipe, lambda: anyio.run(main))


# --- the limit-raw-uds side ----------------------------------------------------------------


def _raw_client(path: str, wid: int, handles: str | None, expect: int, shape: _Shape, pipe: Connection) -> None:
    # A worker receives every event (the broker cannot filter), decodes each one, and calls
    # its handler for those of its source; it is done once every event has arrived.
    async def main() -> None:
        loop = asyncio.get_running_loop()

        def control() -> asyncio.Future[Any]:
            return loop.run_in_executor(None, pipe.recv)

        if handles is None:  # publish-only: no subscriber connection at all
            publisher = await open_publisher(path)
            pipe.send(("ready", os.getpid()))
            await control()  # "sync"
            pipe.send(("flushed",))
            pipe.send(("done", 0, 0))
            await control()
            await publisher.close()
            return
        handled = 0

        def handler(data: Any, event: str, source: str, w: int | None) -> None:
            nonlocal handled
            if event != "warm":
                handled += 1

        warm = shape.pubs * shape.sources  # (the first frames of all: nothing else is sent before "go")
        total = warm + shape.events
        warmed, finished = asyncio.Event(), asyncio.Event()
        reader, writer = await open_subscriber(path)

        async def read() -> int:
            buf = bytearray()
            received = 0
            everything = handles == EVERYTHING
            try:
                while received < total:
                    batch = await receive_events(reader, buf)
                    received += len(batch)
                    for source, event, data in batch:
                        if everything or source == handles:
                            handler(data, event, source, None)
                    if received >= warm:
                        warmed.set()
            finally:  # (a failed read wakes the waiters too; awaiting it then raises)
                warmed.set()
                finished.set()
            return received - warm

        reading = asyncio.ensure_future(read())
        pipe.send(("ready", os.getpid()))
        await control()  # "sync"
        await asyncio.wait_for(warmed.wait(), _DEADLINE)
        if reading.done():
            await reading  # (raises what ended the read)
        pipe.send(("flushed",))
        await asyncio.wait_for(finished.wait(), _DEADLINE)
        pipe.send(("done", handled, await reading))
        await control()
        writer.close()

    _guard(pipe, lambda: asyncio.run(main()))


def _raw_publisher(path: str, wid: int, count: int, sources: int, pipe: Connection) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        publisher = await open_publisher(path)
        pipe.send(("ready", os.getpid()))
        await loop.run_in_executor(None, pipe.recv)  # warm up: one event per source
        for s in range(sources):
            await publisher.publish(f"s{s}", "warm", None)
        await publisher.flush()
        pipe.send(("warmed",))
        await loop.run_in_executor(None, pipe.recv)  # go
        publish = publisher.publish
        for i in range(count):
            await publish(f"s{i % sources}", "tick", i)
        await publisher.flush()
        pipe.send(("done",))
        await loop.run_in_executor(None, pipe.recv)
        await publisher.close()

    _guard(pipe, lambda: asyncio.run(main()))


# --- one measured run, either side ---------------------------------------------------------


@dataclass(frozen=True)
class _Side:
    name: str
    client: Callable[..., None]
    publisher: Callable[..., None]
    #: seconds for the warm-up's events to reach the clients before they are synced
    settle: float


def _expect(pipe: Connection, kind: str) -> Any:
    try:
        if not pipe.poll(_DEADLINE):
            raise RuntimeError(f"subset: no {kind!r} within {_DEADLINE:g}s")
        msg = pipe.recv()
    except EOFError:
        raise RuntimeError(f"subset: a process died before {kind!r}") from None
    if msg[0] == "error":
        raise RuntimeError(f"subset: a process failed:\n{msg[1]}")
    if msg[0] != kind:
        raise RuntimeError(f"subset: expected {kind!r}, got {msg!r}")
    return msg


def _measure(side: _Side, events: int, subs: int, pubs: int, sources: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")
    workdir = tempfile.mkdtemp(prefix="wbf-")
    shape = _Shape(events, pubs, sources)
    procs: list[Any] = []
    stop_broker: Callable[[], None] | None = None
    failed = True
    try:
        def start(target: Any, *args: Any) -> Connection:
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=target, args=(*args, theirs), daemon=True)
            p.start()
            theirs.close()
            procs.append(p)
            return mine

        bpipe: Connection | None = None
        if side.name == "workerbus":
            address = f"unix:{os.path.join(workdir, 'bus.sock')}"
            bpipe = start(_wb_broker, address, events + 1000)
            bpids = [_expect(bpipe, "ready")[1]]
        else:
            handle = RawUdsPeer("asyncio").start(RunSetup(workdir=workdir, n_subs=subs, n_pubs=pubs))
            stop_broker = handle.stop
            address = os.path.join(workdir, "raw.sock")
            bpids = list(handle.pids)
        per_source = events // sources  # events is a multiple of pubs * sources
        roles: list[tuple[str | None, int]] = [(f"s{i % sources}", per_source) for i in range(subs)]
        roles += [(None, 0), (EVERYTHING, events)]  # the publish-only client, the everything one
        clients = [start(side.client, address, i if i < subs else 1000 + i - subs, handles, expect, shape)
                   for i, (handles, expect) in enumerate(roles)]  # fmt: skip
        cpids = [_expect(p, "ready")[1] for p in clients]
        ppipes = [start(side.publisher, address, 2000 + i, events // pubs, sources) for i in range(pubs)]
        ppids = [_expect(p, "ready")[1] for p in ppipes]
        for p in ppipes:
            p.send("warm")
        for p in ppipes:
            _expect(p, "warmed")
        time.sleep(side.settle)
        for p in clients:
            p.send("sync")
        for p in clients:
            _expect(p, "flushed")
        every = [*bpids, *cpids, *ppids]
        before = {pid: procfs.cpu_seconds(pid) for pid in every}
        m0 = procfs.machine_sample()
        t0 = time.monotonic()
        for p in ppipes:
            p.send("go")
        for p in ppipes:
            _expect(p, "done")
        dones = [_expect(p, "done") for p in clients]
        wall = time.monotonic() - t0
        after = {pid: procfs.cpu_seconds(pid) for pid in every}
        m1 = procfs.machine_sample()
        cpu = {pid: after[pid] - before[pid] for pid in every}
        handled = sum(m[1] for m in dones)
        stats: dict[str, Any] = {}
        if bpipe is not None:
            bpipe.send("stats")
            stats = _expect(bpipe, "stats")[1]
        for p in clients + ppipes:
            p.send("exit")
        for proc in procs[len(procs) - len(clients) - len(ppipes) :]:
            proc.join(timeout=10)
        if bpipe is not None:
            bpipe.send("exit")
        total = sum(cpu.values())
        background, _steal = procfs.background_share(m0, m1, total)
        quiet, busy = cpu[cpids[subs]], cpu[cpids[subs + 1]]
        out: dict[str, Any] = {
            "ok": True,
            "handled": handled,
            "expected_handled": subs * per_source + events,
            "wall_s": round(wall, 2),
            "cpu_s": round(total, 3),
            "cpu_s_per_million_handled": round(total / max(handled, 1) * 1e6, 2),
            "broker_cpu_s": round(sum(cpu[p] for p in bpids), 3),
            "subscribers_cpu_s": round(sum(cpu[p] for p in cpids[:subs]), 3),
            "publishers_cpu_s": round(sum(cpu[p] for p in ppids), 3),
            "publish_only_client_cpu_s": round(quiet, 4),
            "everything_client_cpu_s": round(busy, 4),
            "publish_only_vs_subscribed": round(quiet / busy, 4) if busy > 0 else None,
            "background_cpu_pct": round(background, 1),
            **stats,
        }
        if dones[0][2] is not None:  # the raw side counts what it received: every event
            deliveries = sum(m[2] for m in dones)
            out["deliveries"] = deliveries
            out["cpu_s_per_million_deliveries"] = round(total / max(deliveries, 1) * 1e6, 2)
        if handled != out["expected_handled"]:
            raise RuntimeError(f"subset: {handled} events handled, {out['expected_handled']} expected")
        failed = False
        return out
    finally:
        for p in procs:
            if failed and p.is_alive():
                p.kill()  # a failed run's processes may wait for a message that never comes
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        if stop_broker is not None:
            stop_broker()
        shutil.rmtree(workdir, ignore_errors=True)


def run(filtered: bool, events: int, subs: int, pubs: int, sources: int) -> dict[str, Any]:
    """One workerbus run (``filtered``: the default client; else ``Client(filtered=False)``)."""
    side = _Side("workerbus", _wb_client_filtered if filtered else _wb_client_plain,
                 _wb_publisher_filtered if filtered else _wb_publisher_plain, 0.5)  # fmt: skip
    return {"filtered": filtered, **_measure(side, events, subs, pubs, sources)}


def run_raw(events: int, subs: int, pubs: int, sources: int) -> dict[str, Any]:
    """One limit-raw-uds run of the same shape."""
    return _measure(_Side("limit-raw-uds", _raw_client, _raw_publisher, 0.0), events, subs, pubs, sources)


# (module-level, so that the fork start method finds them by name, as it does functions)
def _wb_client_filtered(*args: Any) -> None:
    _wb_client(True, *args)


def _wb_client_plain(*args: Any) -> None:
    _wb_client(False, *args)


def _wb_publisher_filtered(*args: Any) -> None:
    _wb_publisher(True, *args)


def _wb_publisher_plain(*args: Any) -> None:
    _wb_publisher(False, *args)


def _attempt(measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return measure()
    except (RuntimeError, OSError) as exc:
        return {"ok": False, "error": str(exc)[-2000:]}


def run_subset(events: int, *, reps: int = 3) -> dict[str, Any]:
    """workerbus (filtered) and limit-raw-uds, alternating, ``reps`` times each.

    ``events`` is rounded down to a multiple of ``pubs * sources``. Each side's figures are
    medians over its successful runs; ``cpu_vs_raw`` is the median of the ratios of CPU per
    million handled events within each repetition (the two runs of one repetition see
    about the same machine).
    """
    subs, pubs, sources = SUBSET["subs"], SUBSET["pubs"], SUBSET["sources"]
    events = max(events // (pubs * sources), 1) * pubs * sources
    runs: list[dict[str, Any]] = []
    ratios: list[float] = []
    for rep in range(reps):
        wb = _attempt(lambda: run(True, events, subs, pubs, sources))
        raw = _attempt(lambda: run_raw(events, subs, pubs, sources))
        runs += [{"route": "workerbus", "rep": rep, **wb}, {"route": "limit-raw-uds", "rep": rep, **raw}]
        if wb.get("ok") and raw.get("ok"):
            ratios.append(wb["cpu_s_per_million_handled"] / raw["cpu_s_per_million_handled"])
    out: dict[str, Any] = {"events": events, **SUBSET, "reps": reps, "runs": runs}
    for route in ("workerbus", "limit-raw-uds"):
        mine = [r for r in runs if r["route"] == route]
        summary = median_of(mine)
        summary["ok"] = summary["runs_ok"] > 0
        out[route] = summary
    out["cpu_vs_raw"] = round(statistics.median(ratios), 3) if ratios else None
    out["publish_only_vs_subscribed"] = out["workerbus"].get("publish_only_vs_subscribed")
    return out
