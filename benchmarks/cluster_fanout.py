"""Cross-node fan-out: the bridge against the engine used directly by the same processes.

    python -m benchmarks.cluster_fanout [--subscribers 4] [--events 20000] [--rate 5000]
                                        [--seconds 3] [--engine nats|redis]

Two scenarios per path, each with real processes on this machine:
- throughput: one publisher sends --events as fast as it can; each of --subscribers
  processes counts what it receives; deliveries/s = received / (last - first publish);
- latency: the publisher sends --rate events/s for --seconds; each event carries its
  send time (wall clock, one machine); p50/p99 of receive - send over all subscribers.

Paths: ``bridge`` = publisher on node A's broker (workerbus Client, scope cluster),
subscribers on node B's broker; ``direct`` = nats-py (or redis-py) publisher and
subscribers on the engine itself, no workerbus at all.
"""

from __future__ import annotations

import argparse
import asyncio  # noqa: TID251 - the direct path is nats-py / redis-py, asyncio only
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

SUBJECT = "bench.direct"


# --- the processes -------------------------------------------------------------------------

async def _direct_sub(url: str, expect: int) -> dict[str, Any]:
    lat: list[float] = []
    done = asyncio.Event()
    first = last = 0.0

    def got(payload: bytes) -> None:
        nonlocal first, last
        now = time.time()
        msg = json.loads(payload)
        if not first:
            first = now
        last = now
        lat.append(now - msg["t"])
        if len(lat) >= expect:
            done.set()

    if url.startswith("nats"):
        import nats

        nc = await nats.connect(url)

        async def cb(m: Any) -> None:
            got(m.data)

        await nc.subscribe(SUBJECT, cb=cb, pending_msgs_limit=1_000_000)
        await nc.flush()
        print(json.dumps({"ready": True}), flush=True)
        await asyncio.wait_for(done.wait(), 120)
        await nc.close()
    else:
        import redis.asyncio as aioredis

        r = aioredis.from_url(url.replace("redis+unix://", "unix://"))
        ps = r.pubsub(ignore_subscribe_messages=True)
        await ps.subscribe(SUBJECT)
        print(json.dumps({"ready": True}), flush=True)
        while not done.is_set():
            m = await ps.get_message(timeout=120)
            if m is not None:
                got(m["data"])
        await r.aclose()
    return {"lat": lat, "first": first, "last": last}


async def _direct_pub(url: str, events: int, rate: float) -> None:
    if url.startswith("nats"):
        import nats

        nc = await nats.connect(url)
        send = lambda p: nc.publish(SUBJECT, p)  # noqa: E731
    else:
        import redis.asyncio as aioredis

        r = aioredis.from_url(url.replace("redis+unix://", "unix://"))
        send = lambda p: r.publish(SUBJECT, p)  # noqa: E731
    start = time.perf_counter()
    for i in range(events):
        if rate:
            wait = start + i / rate - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
        await send(json.dumps({"t": time.time(), "i": i, "pad": "x" * 16}).encode())
    if url.startswith("nats"):
        await nc.flush()
        await nc.close()
    else:
        await r.aclose()


def _bridge_sub(address: str, expect: int, worker_id: int) -> dict[str, Any]:
    import anyio

    import streambus
    from shared.client import Client

    lat: list[float] = []
    state = {"first": 0.0, "last": 0.0, "lost": 0}

    async def main() -> None:
        done = anyio.Event()

        def got(data: Any, event: str, source: str, wid: int | None) -> None:
            now = time.time()
            if (source, event) in (("workerbus", "lost"), ("workerbus", "dropped")):
                state["lost"] += data["count"]
                if len(lat) + state["lost"] >= expect:
                    done.set()
            if source != "bench":
                return
            if not state["first"]:
                state["first"] = now
            state["last"] = now
            lat.append(now - data["t"])
            if len(lat) + state["lost"] >= expect:
                done.set()

        async with Client(address, transport=streambus.TRANSPORT, worker_id=worker_id, max_queue_len=1_000_000) as bus:
            bus.subscribe("*", "*", got)
            await bus.wait_ready()
            print(json.dumps({"ready": True}), flush=True)
            with anyio.move_on_after(60):  # a shortfall shows in the counts
                await done.wait()

    anyio.run(main)
    return {"lat": lat, **state}


def _bridge_pub(address: str, events: int, rate: float) -> None:
    import anyio

    import streambus
    from shared.client import Client

    async def main() -> None:
        async with Client(address, transport=streambus.TRANSPORT, worker_id=90) as bus:
            await bus.wait_ready()
            start = time.perf_counter()
            for i in range(events):
                if rate:
                    wait = start + i / rate - time.perf_counter()
                    if wait > 0:
                        await anyio.sleep(wait)
                # "others": the publisher does not receive its own events (see docs/cluster.md)
                await bus.publish("bench", "e", {"t": time.time(), "i": i, "pad": "x" * 16}, "others", scope="cluster")
            await bus.flush()

    anyio.run(main)


# --- the parent ----------------------------------------------------------------------------

def _scenario(path: str, url: str, nodes: Any, subscribers: int, events: int, rate: float) -> dict[str, float]:
    py = sys.executable
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    subs = []
    for k in range(subscribers):
        args = [path, url if path == "direct" else nodes[1].address, str(events), str(k)]
        subs.append(subprocess.Popen([py, "-m", "benchmarks.cluster_fanout", "--child", "sub", *args],
                                     stdout=subprocess.PIPE, env=env))
    for p in subs:
        assert p.stdout is not None
        assert json.loads(p.stdout.readline())["ready"]
    target = url if path == "direct" else nodes[0].address
    t0 = time.time()
    subprocess.run([py, "-m", "benchmarks.cluster_fanout", "--child", "pub", path, target, str(events), str(rate)],
                   check=True, env=env, timeout=300)
    results = []
    for p in subs:
        out, _ = p.communicate(timeout=300)
        results.append(json.loads(out.splitlines()[-1]))
    lat = sorted(x for r in results for x in r["lat"])
    last = max(r["last"] for r in results)
    return {
        "lost": sum(r.get("lost", 0) for r in results),
        "deliveries": len(lat),
        "per_s": len(lat) / (last - t0),
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--subscribers", type=int, default=4)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--rate", type=float, default=5000)
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--engine", default="nats", choices=("nats", "redis"))
    parser.add_argument("--backend", default="asyncio", choices=("asyncio", "trio"), help="the brokers' backend")
    parser.add_argument("--child", nargs="+")
    args = parser.parse_args()
    if args.child:
        role, path, target, events, extra = args.child
        if role == "sub":
            if path == "direct":
                res = asyncio.run(_direct_sub(target, int(events)))
            else:
                res = _bridge_sub(target, int(events), int(extra))
            print(json.dumps(res), flush=True)
        elif path == "direct":
            asyncio.run(_direct_pub(target, int(events), float(extra)))
        else:
            _bridge_pub(target, int(events), float(extra))
        return

    from tests.cluster_kit import cluster_dir, engine, nodes

    print(f"cross-node fan-out, {args.engine}, brokers on {args.backend}, {args.subscribers} subscriber processes")
    with cluster_dir() as workdir, engine(args.engine, workdir) as eng, \
            nodes(workdir, [eng.url] * 2, args.backend, extra=("--bridge-buffer", "1000000")) as ns:
        for path in ("direct", "bridge"):
            thr = _scenario(path, eng.url, ns, args.subscribers, args.events, 0)
            lat = _scenario(path, eng.url, ns, args.subscribers, int(args.rate * args.seconds), args.rate)
            print(f"  {path:6}: throughput {thr['per_s']:9.0f} deliveries/s ({thr['deliveries']} deliveries, {thr['lost']} lost); "
                  f"at {args.rate:.0f}/s p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
