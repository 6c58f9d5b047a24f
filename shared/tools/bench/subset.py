"""The "subset" scenario of ``workerbus bench`` (issue #14): workers that handle a part.

``subs`` workers, each subscribed to one of ``sources`` sources, and ``pubs`` publishers
flooding ``events`` events to ``all``, cycling through the sources; plus one publish-only
client (no handlers) and one subscribed to everything. Real processes on a stream broker.
:func:`run` measures it once with the filter (the default client) or without
(``Client(filtered=False)``); :func:`run_subset` measures the filtered bus and, in the same
run, limit-raw-uds with the same workers and publishers (which ships every event to every
worker), and reports the CPU per million *handled* events of both.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import time
from multiprocessing.connection import Connection
from typing import Any

import anyio

import streambus

from . import procfs

__all__ = ["DESCRIPTION", "SUBSET", "run", "run_subset"]

#: The issue's shape: 16 workers, 4 publishers, 8 sources, each worker on one source.
SUBSET = {"subs": 16, "pubs": 4, "sources": 8}
DESCRIPTION = (
    "workerbus stream/asyncio with filters: 16 workers each handling 1 of 8 sources, 4 publishers, "
    "a publish-only client; compared with limit-raw-uds (every event to every worker)"
)

_DEADLINE = 120.0


def _broker(address: str, queue_len: int, pipe: Connection) -> None:
    async def main() -> None:
        # Queues that hold a whole run: a flood must not overflow the slowest client (the
        # one that takes everything), so every run handles every event.
        b = streambus.Broker(max_queue_len=queue_len)
        async with anyio.create_task_group() as tg:
            await tg.start(b.serve, address)
            pipe.send(("ready", os.getpid()))
            await anyio.to_thread.run_sync(pipe.recv)
            stats = b.statistics().router
            pipe.send(("stats", stats.filtered, stats.sent, stats.dropped))
            tg.cancel_scope.cancel()

    anyio.run(main)


def _client(address: str, wid: int, filtered: bool, pattern: tuple[str, str] | None, expect: int,
            pipe: Connection) -> None:
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
            if pattern is not None:
                c.subscribe(*pattern, handler)
            await c.wait_ready()
            pipe.send(("ready", os.getpid()))
            await anyio.to_thread.run_sync(pipe.recv)  # "synced": warm-up seen, filters set
            await c.flush()
            pipe.send(("flushed",))
            if expect:
                with anyio.fail_after(_DEADLINE):
                    await done.wait()
            pipe.send(("done", handled))
            await anyio.to_thread.run_sync(pipe.recv)

    anyio.run(main)


def _publisher(address: str, wid: int, filtered: bool, count: int, sources: int, pipe: Connection) -> None:
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

    anyio.run(main)


def _expect(pipe: Connection, kind: str) -> Any:
    if not pipe.poll(_DEADLINE):
        raise RuntimeError(f"subset: no {kind!r} within {_DEADLINE:g}s")
    msg = pipe.recv()
    if msg[0] != kind:
        raise RuntimeError(f"subset: expected {kind!r}, got {msg!r}")
    return msg


def run(filtered: bool, events: int, subs: int, pubs: int, sources: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")
    workdir = tempfile.mkdtemp(prefix="wbf-")
    address = f"unix:{os.path.join(workdir, 'bus.sock')}"
    procs: list[Any] = []
    try:
        def start(target: Any, *args: Any) -> Connection:
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=target, args=(*args, theirs), daemon=True)
            p.start()
            procs.append(p)
            return mine

        bpipe = start(_broker, address, events + 1000)
        bpid = _expect(bpipe, "ready")[1]
        per_source = events // sources  # events is a multiple of pubs * sources
        spipes = [start(_client, address, i, filtered, (f"s{i % sources}", "*"), per_source) for i in range(subs)]
        quiet = start(_client, address, 1000, filtered, None, 0)
        everything = start(_client, address, 1001, filtered, ("*", "*"), events)
        clients = [*spipes, quiet, everything]
        cpids = [_expect(p, "ready")[1] for p in clients]
        ppipes = [start(_publisher, address, 2000 + i, filtered, events // pubs, sources) for i in range(pubs)]
        ppids = [_expect(p, "ready")[1] for p in ppipes]
        for p in ppipes:
            p.send("warm")
        for p in ppipes:
            _expect(p, "warmed")
        time.sleep(0.5)  # the warm-up's unhandled events reach the clients: they narrow
        for p in clients:
            p.send("sync")
        for p in clients:
            _expect(p, "flushed")
        every = [bpid, *cpids, *ppids]
        before = {pid: procfs.cpu_seconds(pid) for pid in every}
        m0 = procfs.machine_sample()
        t0 = time.monotonic()
        for p in ppipes:
            p.send("go")
        for p in ppipes:
            _expect(p, "done")
        handled = sum(_expect(p, "done")[1] for p in clients)
        wall = time.monotonic() - t0
        after = {pid: procfs.cpu_seconds(pid) for pid in every}
        m1 = procfs.machine_sample()
        cpu = {pid: after[pid] - before[pid] for pid in every}
        bpipe.send("stats")
        _, filtered_count, sent, dropped = _expect(bpipe, "stats")
        for p in clients + ppipes:
            p.send("exit")
        total = sum(cpu.values())
        background, _steal = procfs.background_share(m0, m1, total)
        return {
            "filtered": filtered,
            "handled": handled,
            "wall_s": round(wall, 2),
            "cpu_s": round(total, 2),
            "cpu_s_per_million_handled": round(total / handled * 1e6, 1),
            "broker_cpu_s": round(cpu[bpid], 2),
            "subscribers_cpu_s": round(sum(cpu[p] for p in cpids[:subs]), 2),
            "publishers_cpu_s": round(sum(cpu[p] for p in ppids), 2),
            "publish_only_client_cpu_s": round(cpu[cpids[subs]], 3),
            "everything_client_cpu_s": round(cpu[cpids[subs + 1]], 3),
            "broker_sent": sent,
            "broker_filtered": filtered_count,
            "broker_dropped": dropped,
            "background_cpu_pct": round(background, 1),
        }
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        shutil.rmtree(workdir, ignore_errors=True)


def run_subset(events: int, *, timeout: float = 90.0) -> dict[str, Any]:
    """The filtered bus, then limit-raw-uds with the same workers and publishers.

    ``events`` is rounded down to a multiple of ``pubs * sources``. limit-raw-uds handles
    every event in every worker (it cannot filter), so its CPU per million handled events
    is its CPU per million deliveries.
    """
    from .fanout import run_one

    subs, pubs, sources = SUBSET["subs"], SUBSET["pubs"], SUBSET["sources"]
    events = max(events // (pubs * sources), 1) * pubs * sources
    out: dict[str, Any] = {"events": events, **SUBSET}
    try:
        out["workerbus"] = {"ok": True, **run(True, events, subs, pubs, sources)}
    except (RuntimeError, OSError) as exc:
        out["workerbus"] = {"ok": False, "error": str(exc)}
    raw = run_one("limit-raw-uds", test="thr", n_subs=subs, n_pubs=pubs, events=events, timeout=timeout)
    out["limit-raw-uds"] = raw
    mine = out["workerbus"].get("cpu_s_per_million_handled")
    theirs = raw.get("total_cpu_s_per_M") if raw.get("ok") else None
    out["cpu_vs_raw"] = None if not mine or not theirs else round(mine / theirs, 3)
    quiet = out["workerbus"].get("publish_only_client_cpu_s")
    busy = out["workerbus"].get("everything_client_cpu_s")
    out["publish_only_vs_subscribed"] = None if quiet is None or not busy else round(quiet / busy, 4)
    return out
