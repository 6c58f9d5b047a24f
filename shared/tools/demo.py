"""``workerbus demo``: a broker and N real worker processes publishing to each other.

Each worker connects as id i, then publishes one event to all workers, one unique event
(the same key everywhere, so exactly one worker handles it), one to its neighbour, and a
"done" marker to all. Since every worker receives in one global order and each publisher's
events in publish order, a worker that has seen every "done" has seen everything meant for
it. The parent prints what each worker received and checks the totals against what the
routing rules say must arrive.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any

import anyio

from shared.client import Client
from shared.transportnames import load_transport

from .interrupts import deferred

__all__ = ["run_demo"]

_DEADLINE = 20.0


async def _worker(address: str, transport: str, worker_id: int, workers: int) -> dict[str, Any]:
    received: list[dict[str, Any]] = []
    done = anyio.Event()
    done_from: set[int] = set()

    def record(data: Any, event: str, source: str, wid: int | None) -> None:
        received.append({"source": source, "event": event, "data": data, "wid": wid})
        if (source, event) == ("demo", "done") and wid is not None:
            done_from.add(wid)
            if len(done_from) == workers:
                done.set()

    async with Client(address, transport=load_transport(transport), worker_id=worker_id) as bus:
        bus.subscribe("*", "*", record)
        await bus.wait_ready()
        await bus.publish("cache", "invalidate", {"key": f"user:{worker_id}"})
        await bus.publish("router", "rebuild", {"by": worker_id}, "unique:router-rebuild")
        await bus.publish("health", "ping", {"from": worker_id}, f"worker:{(worker_id + 1) % workers}")
        await bus.publish("demo", "done")
        await done.wait()
        stats = bus.statistics()
    return {
        "worker": worker_id,
        "pid": os.getpid(),
        "received": received,
        "dropped": stats.dropped + stats.dropped_by_broker,
        "published": stats.published,
    }


def _worker_main(address: str, transport: str, worker_id: int, workers: int) -> None:
    async def main() -> dict[str, Any]:
        with anyio.fail_after(_DEADLINE):
            return await _worker(address, transport, worker_id, workers)

    print(json.dumps(anyio.run(main)), flush=True)


def _wait_for_socket(path: str, proc: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the broker exited early with status {proc.returncode}")
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(path)
                return
            except OSError:
                time.sleep(0.02)
    raise RuntimeError("the broker did not start listening in time")


def _describe(result: dict[str, Any]) -> str:
    counts = Counter((e["source"], e["event"]) for e in result["received"])
    parts = []
    for (source, event), n in sorted(counts.items()):
        senders = sorted({e["wid"] for e in result["received"] if (e["source"], e["event"]) == (source, event)})
        parts.append(f"{source}/{event} x{n} from {senders}")
    return "; ".join(parts)


def run_demo(*, workers: int = 4, transport: str = "http") -> int:
    """Run the demo; returns the process exit status (0 when every delivery checked out)."""
    if workers < 1:
        print("workerbus demo: --workers must be at least 1", file=sys.stderr)
        return 2
    started = time.monotonic()
    py = sys.executable
    procs: list[subprocess.Popen[bytes]] = []
    tmp = tempfile.mkdtemp(prefix="workerbus-demo-")
    # (right after the directory exists: an interrupt before `try` would leave it behind)
    try:
        path = os.path.join(tmp, "bus.sock")
        address = f"unix:{path}"
        print(f"workerbus demo: a broker and {workers} worker processes over {transport} ({address})")
        with deferred():  # (a child started is a child in procs, stopped below)
            broker = subprocess.Popen(
                [py, "-m", "shared.tools.cli", "broker", "--listen", address, "--transport", transport,
                 "--workers", str(workers), "--log-level", "WARNING"],
            )
            procs.append(broker)
        _wait_for_socket(path, broker, time.monotonic() + _DEADLINE)
        with deferred():
            procs.extend(
                subprocess.Popen(
                    [py, "-m", "shared.tools.demo", address, transport, str(wid), str(workers)],
                    stdout=subprocess.PIPE,
                )
                for wid in range(workers)
            )
        results = []
        for proc in procs[1:]:
            out, _ = proc.communicate(timeout=_DEADLINE + 5)
            if proc.returncode != 0:
                print(f"a worker failed with status {proc.returncode}", file=sys.stderr)
                return 1
            results.append(json.loads(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        try:
            os.rmdir(tmp)
        except OSError:
            pass
    elapsed = time.monotonic() - started
    for r in sorted(results, key=lambda r: r["worker"]):
        print(f"  worker {r['worker']} (pid {r['pid']}) received {len(r['received'])}: {_describe(r)}")
    deliveries = sum(len(r["received"]) for r in results)
    dropped = sum(r["dropped"] for r in results)
    published = sum(r["published"] for r in results)
    # all + done reach every worker; one ping per worker; the unique event exactly once.
    expected = 2 * workers * workers + workers + 1
    unique_handlers = [r["worker"] for r in results for e in r["received"] if e["event"] == "rebuild"]
    ok = deliveries == expected and dropped == 0 and len(unique_handlers) == 1
    print(
        f"summary: {published} events published, {deliveries} deliveries ({expected} expected), "
        f"{dropped} dropped, unique router/rebuild handled by worker(s) {unique_handlers}, "
        f"{elapsed:.2f} s -> {'OK' if ok else 'MISMATCH'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        _worker_main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    except KeyboardInterrupt:  # Ctrl-C reaches the whole group: the parent says it once
        sys.exit(130)
