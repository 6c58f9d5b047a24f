"""``workerbus demo --nodes N``: N nodes of W worker processes joined through a NATS server.

The demo starts ``nats-server`` itself (loopback, a free port, JetStream in a temp
directory), one ``workerbus broker --bridge`` per node, and W worker processes per node.
Each worker publishes a cluster broadcast, a host-local broadcast, a cluster-unique event
(the same key everywhere: one worker in the whole cluster handles it) and a cluster
"done" marker. One order per publisher means that a worker that has seen every "done"
has seen everything meant for it; the parent prints what each worker received and checks
the totals against the rules of docs/cluster.md.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import anyio

import streambus

from .interrupts import deferred

__all__ = ["run_cluster_demo"]

_DEADLINE = 30.0


async def _worker(address: str, node: str, worker_id: int, total: int) -> dict[str, Any]:
    received: list[dict[str, Any]] = []
    done = anyio.Event()
    done_from: set[tuple[str, int]] = set()

    def record(data: Any, event: str, source: str, wid: int | None) -> None:
        origin = getattr(wid, "node", None) or node
        received.append({"source": source, "event": event, "node": origin, "wid": None if wid is None else int(wid)})
        if (source, event) == ("demo", "done") and wid is not None:
            done_from.add((origin, int(wid)))
            if len(done_from) == total:
                done.set()

    async with streambus.connect(address, worker_id=worker_id) as bus:
        bus.subscribe("*", "*", record)
        await bus.wait_ready()
        await bus.publish("cache", "invalidate", {"key": f"{node}:{worker_id}"}, scope="cluster")
        await bus.publish("local", "tick", {"from": worker_id})
        await bus.publish("config", "reload", None, "unique:config-reload", scope="cluster")
        await bus.publish("demo", "done", None, scope="cluster")
        await done.wait()
        await bus.flush()
        stats = bus.statistics()
    return {"node": node, "worker": worker_id, "received": received, "dropped": stats.dropped + stats.dropped_by_broker}


def _worker_main(address: str, node: str, worker_id: int, total: int) -> None:
    async def main() -> dict[str, Any]:
        with anyio.fail_after(_DEADLINE):
            return await _worker(address, node, worker_id, total)

    print(json.dumps(anyio.run(main)), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(check: Any, what: str, procs: list[subprocess.Popen[bytes]], deadline: float) -> None:
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: a process exited early with status {proc.returncode}")
        if check():
            return
        time.sleep(0.02)
    raise RuntimeError(f"{what}: not ready in time")


def _connects(family: int, address: Any) -> bool:
    with socket.socket(family) as probe:
        return probe.connect_ex(address) == 0


def run_cluster_demo(*, nodes: int = 2, workers: int = 4) -> int:
    """Run the demo; returns the exit status (0 when every delivery checked out)."""
    from .statsserver import fetch_stats

    if nodes < 2 or workers < 1:
        print("workerbus demo: --nodes must be at least 2 and --workers at least 1", file=sys.stderr)
        return 2
    # (Debian installs it in /usr/sbin, which a user's PATH may not have)
    server = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin:/usr/local/sbin")
    if server is None:
        print("workerbus demo: nats-server is not installed (bash scripts/setup.sh installs it)", file=sys.stderr)
        return 1
    started = time.monotonic()
    deadline = started + _DEADLINE
    py = sys.executable
    procs: list[subprocess.Popen[bytes]] = []
    results: list[dict[str, Any]] = []
    tmp = tempfile.mkdtemp(prefix="workerbus-cluster-")
    # (right after the directory exists: an interrupt before `try` would leave it behind)
    try:
        port = _free_port()
        url = f"nats://127.0.0.1:{port}"
        total = nodes * workers
        print(f"workerbus demo: {nodes} nodes x {workers} worker processes through nats-server at {url}")
        with deferred():  # (a child started is a child in procs, stopped below)
            nats = subprocess.Popen(
                [server, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", os.path.join(tmp, "js")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            procs.append(nats)
        _wait(lambda: _connects(socket.AF_INET, ("127.0.0.1", port)), "nats-server", procs, deadline)
        names = [f"node{i}" for i in range(nodes)]
        with deferred():
            procs.extend(
                subprocess.Popen(
                    [py, "-m", "shared.tools.cli", "broker", "--listen", f"unix:{tmp}/{name}.sock",
                     "--transport", "stream", "--workers", str(workers), "--bridge", url, "--node", name,
                     "--stats-listen", f"unix:{tmp}/{name}.stats", "--log-level", "WARNING"],
                )
                for name in names
            )
        for name in names:
            def bridged(name: str = name) -> bool:
                if not _connects(socket.AF_UNIX, f"{tmp}/{name}.stats"):
                    return False
                stats = json.loads(fetch_stats(f"unix:{tmp}/{name}.stats", as_json=True))
                return bool(stats["bridge"]["engine_connected"])

            _wait(bridged, f"broker {name}", procs, deadline)
        children: list[subprocess.Popen[bytes]] = []
        with deferred():
            for name in names:
                for wid in range(workers):
                    child = subprocess.Popen(
                        [py, "-m", "shared.tools.demo_cluster", f"unix:{tmp}/{name}.sock", name, str(wid), str(total)],
                        stdout=subprocess.PIPE,
                    )
                    children.append(child)
                    procs.append(child)
        for proc in children:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()) + 5)
            if proc.returncode != 0:
                print(f"a worker failed with status {proc.returncode}", file=sys.stderr)
                return 1
            results.append(json.loads(out))
        bridge_totals = [
            json.loads(fetch_stats(f"unix:{tmp}/{name}.stats", as_json=True))["bridge"] for name in names
        ]
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - started
    ok = True
    for r in results:
        got = r["received"]
        cluster = {(e["node"], e["wid"]) for e in got if e["event"] == "invalidate"}
        local = [e for e in got if e["event"] == "tick"]
        lost = [e for e in got if e["event"] == "lost"]
        good = len(cluster) == total and len(local) == workers and {e["node"] for e in local} == {r["node"]} and not lost
        ok = ok and good and r["dropped"] == 0
        print(
            f"  {r['node']} worker {r['worker']}: cluster invalidate from {len(cluster)}/{total} workers "
            f"on {len({n for n, _ in cluster})} nodes, local tick x{len(local)} (own node only), "
            f"{len(lost)} lost notices{'' if good else '  <- MISMATCH'}"
        )
    handlers = [(r["node"], r["worker"]) for r in results for e in r["received"] if e["event"] == "reload"]
    sent = sum(b["sent"] for b in bridge_totals)
    lost_total = sum(b["lost"] for b in bridge_totals)
    ok = ok and len(handlers) == 1 and lost_total == 0 and len(results) == total
    print(
        f"summary: {len(results)} workers on {nodes} nodes, {sent} cluster events through NATS, "
        f"{lost_total} lost, unique config/reload (published by all {total}) handled by {handlers}, "
        f"{elapsed:.2f} s -> {'OK' if ok else 'MISMATCH'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        _worker_main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    except KeyboardInterrupt:  # Ctrl-C reaches the whole group: the parent says it once
        sys.exit(130)
