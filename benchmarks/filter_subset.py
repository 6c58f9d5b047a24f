"""Whole-system CPU when each worker handles a subset of the events (issue #14, ``filter``).

    python benchmarks/filter_subset.py [--events 40000] [--subs 16] [--pubs 4] [--sources 8]

Real processes on a stream broker: ``--subs`` subscribers, each with one handler on
``(s<i % sources>, "*")``; ``--pubs`` publishers flood ``--events`` events to ``all``,
cycling through the sources; plus one publish-only client (no handlers) and one subscribed
to every event ("*", "*"). Run twice: with the filter (the default client) and without
(``Client(filtered=False)``). Reported: CPU of every process (broker, subscribers,
publishers, the two extra clients) per million handled events, and the publish-only and
the everything client's own CPU. Numbers from a shared machine: compare runs, not
absolutes.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from typing import Any

import anyio

import streambus
from shared.tools.bench import procfs

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
        raise SystemExit(f"filter_subset: no {kind!r} within {_DEADLINE:g}s")
    msg = pipe.recv()
    if msg[0] != kind:
        raise SystemExit(f"filter_subset: expected {kind!r}, got {msg!r}")
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
        t0 = time.monotonic()
        for p in ppipes:
            p.send("go")
        for p in ppipes:
            _expect(p, "done")
        handled = sum(_expect(p, "done")[1] for p in clients)
        wall = time.monotonic() - t0
        after = {pid: procfs.cpu_seconds(pid) for pid in every}
        cpu = {pid: after[pid] - before[pid] for pid in every}
        bpipe.send("stats")
        _, filtered_count, sent, dropped = _expect(bpipe, "stats")
        for p in clients + ppipes:
            p.send("exit")
        total = sum(cpu.values())
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
        }
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=96_000)
    ap.add_argument("--subs", type=int, default=16)
    ap.add_argument("--pubs", type=int, default=4)
    ap.add_argument("--sources", type=int, default=8)
    args = ap.parse_args()
    if args.events % (args.pubs * args.sources):
        print(f"filter_subset: --events must be a multiple of pubs * sources = {args.pubs * args.sources}",
              file=sys.stderr)
        return 2
    for filtered in (True, False):
        print(run(filtered, args.events, args.subs, args.pubs, args.sources), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
