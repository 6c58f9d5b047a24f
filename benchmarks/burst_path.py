"""CPU of one small burst through the whole bus, in one process: the latency test's path.

    python benchmarks/burst_path.py [--subs 4] [--burst 10] [--bursts 2000] [--backend asyncio]

A real broker, one publisher and ``--subs`` subscribers (real clients over a Unix socket,
stream transport), all in one event loop. Each round publishes ``--burst`` events, calls
``flush()`` (the barrier, as the latency test's publisher does every tick) and waits until
every subscriber's handler has seen the last one; then, after ``--pace`` seconds (the
latency test's 1 ms tick), the next round. Prints the process
CPU per burst (best of 3 blocks), the wall time per burst, and the median time from a
burst's first publish to its last handler call (one process: every hop, no waiting for
another process to get a CPU). CPU time counts every hop's
Python work and loop turns of every party, whatever else runs on the machine; it is what
the latency test's processes compete for on a busy machine. Run it against another tree
with ``PYTHONPATH=<tree>`` for an A/B.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from contextlib import AsyncExitStack
from typing import Any

import anyio

import streambus
from shared.broker import Broker
from shared.client import Client
from shared.messages import OTHERS


async def measure(subs: int, burst: int, bursts: int, pace: float = 0.001) -> tuple[float, float, float]:
    path = os.path.join(tempfile.mkdtemp(prefix="wb-burst-"), "bus.sock")
    address = f"unix:{path}"
    broker = Broker(transport=streambus.TRANSPORT, expected_workers=subs + 1)
    seen = [0] * subs
    done = anyio.Event()
    target = 0

    def handler_for(index: int) -> Any:
        def handler(data: Any, event: str, source: str, wid: int | None) -> None:
            nonlocal done
            seen[index] += 1
            if all(n >= target for n in seen):
                done.set()

        return handler

    async with anyio.create_task_group() as tg, AsyncExitStack() as stack:
        await tg.start(broker.serve, address)
        clients = [Client(address, transport=streambus.TRANSPORT, worker_id=i) for i in range(subs + 1)]
        for i, c in enumerate(clients):
            await stack.enter_async_context(c)
            await c.wait_ready()
            if i < subs:
                c.subscribe("bench", "*", handler_for(i))
        pub = clients[subs]
        publish = pub.publish
        best_cpu = float("inf")
        best_wall = float("inf")
        walls: list[float] = []
        for _block in range(4):  # the first block warms up (subscription filters, caches)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            for _ in range(bursts):
                target += burst
                done = anyio.Event()
                t0 = time.perf_counter()
                for i in range(burst):
                    await publish("bench", "tick", {"i": i, "ts": 0}, OTHERS)
                await pub.flush()
                with anyio.fail_after(10):
                    await done.wait()
                if _block:
                    walls.append(time.perf_counter() - t0)
                await anyio.sleep(pace)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            if _block:
                best_cpu, best_wall = min(best_cpu, cpu), min(best_wall, wall)
        await stack.aclose()
        tg.cancel_scope.cancel()
    walls.sort()
    return best_cpu / bursts * 1e6, best_wall / bursts * 1e6, walls[len(walls) // 2] * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subs", type=int, default=4)
    ap.add_argument("--burst", type=int, default=10)
    ap.add_argument("--bursts", type=int, default=2000)
    ap.add_argument("--backend", default="asyncio", choices=("asyncio", "trio"))
    ap.add_argument("--pace", type=float, default=0.001, help="seconds between bursts (the latency test's tick)")
    args = ap.parse_args()
    cpu, wall, p50 = anyio.run(measure, args.subs, args.burst, args.bursts, args.pace, backend=args.backend)
    print(f"{cpu:8.1f} µs CPU per burst  {wall:8.1f} µs wall per burst  p50 publish → last handler {p50:6.1f} µs  "
          f"({args.burst} events, {args.subs} subscribers, {args.backend})")


if __name__ == "__main__":
    main()
