"""The embedded host's own path, in one process: in process vs over the socket.

    python -m benchmarks.host_path [--burst 1000] [--rounds 40] [--busy-ms 0.5] [--backend asyncio|uvloop|trio]

Two embedded workers (:func:`shared.embed.join`, stream transport) share one event loop,
as in the seed experiment's two servers: the first hosts the broker. Each round both
publish a burst of ``--burst`` events to ``all`` (the seed's storm) and wait until both
handlers have seen all ``2 x burst``. Blocks alternate between the host's own client
connected in process (``in_process=True``) and over the Unix socket (``in_process=False``,
the default), fresh workers per block. Printed per mode: the process CPU per
handled event (best block), and the medians over rounds of the time from the round's
first publish to the last handler call of the host and of the other worker.

``--busy-ms`` adds a task that burns that much CPU per loop turn (a saturated server's
ready HTTP callbacks): every turn a hop waits for then costs at least that, so the number
of turns on the path shows in the delays. The CPU figure excludes nothing: it is every
party's work and loop turns, busy task included (the same in both modes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import anyio
import anyio.lowlevel

from shared.embed import join


async def _busy(ms: float) -> None:
    while True:
        end = time.perf_counter() + ms / 1000
        while time.perf_counter() < end:
            pass
        await anyio.lowlevel.checkpoint()


async def block(in_process: bool, burst: int, rounds: int, busy_ms: float) -> dict[str, float]:
    address = f"unix:{os.path.join(tempfile.mkdtemp(prefix='wb-host-'), 'bus.sock')}"
    seen = [0, 0]
    last = [0.0, 0.0]
    target = 0
    done = anyio.Event()

    def handler_for(index: int) -> Any:
        def handler(data: Any, event: str, source: str, wid: int | None) -> None:
            seen[index] += 1
            if seen[index] >= target:
                last[index] = time.perf_counter()
                if seen[0] >= target and seen[1] >= target:
                    done.set()

        return handler

    async with anyio.create_task_group() as tg:
        async with join(address, workers=2, transport="stream", in_process=in_process) as host:
            async with join(address, workers=2, transport="stream", in_process=in_process) as other:
                assert host.is_broker and not other.is_broker
                host.subscribe("bench", "*", handler_for(0))
                other.subscribe("bench", "*", handler_for(1))
                await host.wait_ready()
                await other.wait_ready()
                if busy_ms:
                    tg.start_soon(_busy, busy_ms)
                to_host: list[float] = []
                to_other: list[float] = []
                cpu = 0.0
                for n in range(rounds + 2):  # two warm-up rounds
                    target += 2 * burst
                    done = anyio.Event()
                    cpu0 = time.process_time()
                    t0 = time.perf_counter()
                    for i in range(burst):
                        host.publish_nowait("bench", "tick", {"i": i}, "all")
                        other.publish_nowait("bench", "tick", {"i": i}, "all")
                    with anyio.fail_after(30):
                        await done.wait()
                    if n >= 2:
                        cpu += time.process_time() - cpu0
                        to_host.append(last[0] - t0)
                        to_other.append(last[1] - t0)
                tg.cancel_scope.cancel()
    return {
        "cpu_ns_per_event": cpu / (rounds * 4 * burst) * 1e9,
        "host_ms": statistics.median(to_host) * 1e3,
        "other_ms": statistics.median(to_other) * 1e3,
    }


async def main_async(args: argparse.Namespace) -> None:
    results: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    for b in range(args.blocks):
        for mode in (True, False) if b % 2 == 0 else (False, True):
            results[mode].append(await block(mode, args.burst, args.rounds, args.busy_ms))
    for mode, rows in results.items():
        name = "in process" if mode else "socket    "
        each = ", ".join(f"{r['cpu_ns_per_event']:.0f}" for r in rows)
        print(
            f"{name}  CPU {min(r['cpu_ns_per_event'] for r in rows):7.0f} ns/handled event (best of"
            f" {len(rows)}; all: {each})"
            f"  burst -> last handler: host {statistics.median(r['host_ms'] for r in rows):6.2f} ms,"
            f" other {statistics.median(r['other_ms'] for r in rows):6.2f} ms"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--burst", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--busy-ms", type=float, default=0.0)
    ap.add_argument("--backend", default="asyncio", choices=("asyncio", "uvloop", "trio"))
    args = ap.parse_args()
    import streambus  # noqa: F401  (registers transport="stream")

    if args.backend == "uvloop":  # (what uvicorn runs the seed's servers on)
        anyio.run(main_async, args, backend="asyncio", backend_options={"use_uvloop": True})
    else:
        anyio.run(main_async, args, backend=args.backend)


if __name__ == "__main__":
    main()
