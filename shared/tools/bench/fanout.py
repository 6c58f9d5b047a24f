"""One measured fan-out run: a broker, N subscriber and P publisher processes.

1. The peer starts its broker (its own process) and says where it listens.
2. N subscribers are forked and subscribe; then P publishers are forked and connect.
3. Every publisher sends a ``sync`` probe every 5 ms until every subscriber has seen one
   of its events (shared flags), so no measured event is lost to a subscription that is
   not active yet. Not measured.
4. CPU of every process and of the whole machine is sampled; publishers get ``go``.
5. Publishers send their share of the events (a flood, or a fixed rate in ~1 ms bursts),
   then one ``end`` each; a subscriber is done after every publisher's ``end`` (all peers
   keep each publisher's events in order).
6. CPU and the broker's peak RSS are sampled again; everything is stopped by pid.

Every wait has a deadline; a run that misses one is killed and reported as failed.
"""

from __future__ import annotations

import multiprocessing
import shutil
import statistics
import tempfile
import time
import traceback
from array import array
from multiprocessing.connection import Connection, wait
from typing import Any

from . import procfs
from .peers import make_peer
from .peers.base import BrokerHandle, RunSetup
from .worker import Plan, publisher_main, subscriber_main

__all__ = ["RunFailed", "median_of", "percentile", "run_one"]


class RunFailed(Exception):
    """A run could not be completed (a deadline passed, a worker failed)."""


def percentile(ordered: list[int] | list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return float(ordered[k])


def _collect(conns: list[Connection], tag: str, deadline: float, what: str) -> list[tuple[Any, ...]]:
    """One ``tag`` message from every worker, in worker order, before ``deadline``."""
    got: dict[int, tuple[Any, ...]] = {}
    pending = {c: i for i, c in enumerate(conns)}
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RunFailed(f"timed out waiting for {what} ({len(pending)} of {len(conns)} missing)")
        for ready in wait(list(pending), timeout=left):
            assert isinstance(ready, Connection)
            try:
                msg = ready.recv()
            except EOFError:
                raise RunFailed(f"{what}: a worker died") from None
            if msg[0] == "error":
                raise RunFailed(f"{what}: a worker failed:\n{msg[1]}")
            if msg[0] != tag:
                raise RunFailed(f"{what}: unexpected message {msg[0]!r}")
            got[pending.pop(ready)] = msg
    return [got[i] for i in range(len(conns))]


def run_one(
    scenario: str,
    *,
    test: str,
    n_subs: int,
    n_pubs: int,
    events: int,
    rate: float = 0.0,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Measure one configuration once.

    Args:
        test: ``"thr"`` (flood ``events`` as fast as possible) or ``"lat"`` (``events`` at
            ``rate`` events/s in total).

    Returns a JSON-ready dict; ``ok`` is False (with ``error``) for a failed run.
    """
    peer = make_peer(scenario)
    base: dict[str, Any] = {
        "scenario": scenario,
        "test": test,
        "n_subs": n_subs,
        "n_pubs": n_pubs,
        "events": events,
        "rate": rate if test == "lat" else None,
    }
    reason = peer.unavailable()
    if reason:
        return {**base, "ok": False, "error": f"unavailable: {reason}", "unavailable": True}
    counts = [events // n_pubs + (1 if i < events % n_pubs else 0) for i in range(n_pubs)]
    per_pub_rate = rate / n_pubs if test == "lat" else 0.0
    ctx = multiprocessing.get_context("fork")
    workdir = tempfile.mkdtemp(prefix="wbench-", dir="/tmp")
    setup = RunSetup(workdir=workdir, n_subs=n_subs, n_pubs=n_pubs)
    deadline = time.monotonic() + timeout
    procs: list[Any] = []  # multiprocessing Process objects
    conns: list[Connection] = []
    broker: BrokerHandle | None = None
    failed = True
    try:
        broker = peer.start(setup)
        seen = ctx.RawArray("b", n_subs * n_pubs)
        sub_conns: list[Connection] = []
        for i in range(n_subs):
            mine, theirs = ctx.Pipe()
            p = ctx.Process(
                target=subscriber_main, args=(peer, setup, i, theirs, seen, test == "lat"), daemon=True
            )
            p.start()
            theirs.close()
            procs.append(p)
            sub_conns.append(mine)
        conns.extend(sub_conns)
        sub_ready = _collect(sub_conns, "ready", min(deadline, time.monotonic() + 30), "subscribers to connect")
        pub_conns: list[Connection] = []
        for i in range(n_pubs):
            mine, theirs = ctx.Pipe()
            plan = Plan(count=counts[i], rate=per_pub_rate)
            p = ctx.Process(target=publisher_main, args=(peer, setup, i, theirs, seen, plan), daemon=True)
            p.start()
            theirs.close()
            procs.append(p)
            pub_conns.append(mine)
        conns.extend(pub_conns)
        pub_ready = _collect(pub_conns, "ready", min(deadline, time.monotonic() + 30), "publishers to connect")
        for c in pub_conns:
            c.send("sync")
        _collect(pub_conns, "synced", min(deadline, time.monotonic() + 30), "the sync probe")
        time.sleep(0.05)  # let the last probes drain before measuring
        broker_pids = list(broker.pids)
        sub_pids = [m[1] for m in sub_ready]
        pub_pids = [m[1] for m in pub_ready]
        b0 = sum(procfs.cpu_seconds(p) for p in broker_pids)
        s0 = sum(procfs.cpu_seconds(p) for p in sub_pids)
        p0 = sum(procfs.cpu_seconds(p) for p in pub_pids)
        k0 = _kernel_ticks(broker_pids, sub_pids)
        m0 = procfs.machine_sample()
        for c in pub_conns:
            c.send("go")
        pub_done = _collect(pub_conns, "done", deadline, "publishers to finish")
        sub_done = _collect(sub_conns, "done", deadline, "subscribers to receive everything")
        m1 = procfs.machine_sample()
        b1 = sum(procfs.cpu_seconds(p) for p in broker_pids)
        s1 = sum(procfs.cpu_seconds(p) for p in sub_pids)
        p1 = sum(procfs.cpu_seconds(p) for p in pub_pids)
        k1 = _kernel_ticks(broker_pids, sub_pids)
        rss = sum(procfs.peak_rss_kib(p) for p in broker_pids)
        for c in conns:
            c.send("exit")
        latencies: array[int] = array("q")
        for m in sub_done:
            if m[3]:
                latencies.frombytes(m[3])
        result = _summarize(
            base,
            has_broker=peer.has_broker,
            delivered=sum(m[1] for m in sub_done),
            expected=n_subs * events,
            first_ns=min(m[1] for m in pub_done),
            published_ns=max(m[2] for m in pub_done),
            last_ns=max(m[2] for m in sub_done),
            broker_cpu=b1 - b0,
            sub_cpu=s1 - s0,
            pub_cpu=p1 - p0,
            rss_kib=rss,
            latencies=latencies,
        )
        # Share of the broker's and the subscribers' CPU spent in the kernel (socket I/O).
        for role, (a, b) in (("broker", (k0[0], k1[0])), ("sub", (k0[1], k1[1]))):
            busy = (b[0] - a[0]) + (b[1] - a[1])
            result[f"{role}_kernel_pct"] = round(100 * (b[1] - a[1]) / busy, 1) if busy > 0 else None
        bg, steal = procfs.background_share(m0, m1, (b1 - b0) + (s1 - s0) + (p1 - p0))
        result["background_cpu_pct"] = round(bg, 1)
        result["steal_pct"] = round(steal, 1)
        failed = False
        return result
    except Exception as exc:  # noqa: BLE001 - a failed run is a result, not a crash
        detail = str(exc) if isinstance(exc, RunFailed) else traceback.format_exc()
        return {**base, "ok": False, "error": f"{type(exc).__name__}: {detail}"[-2000:]}
    finally:
        for p in procs:
            if failed and p.is_alive():
                p.kill()  # a failed run's workers may be stuck: do not wait for them
        for p in procs:
            p.join(timeout=3)
            if p.is_alive():
                p.kill()
                p.join(timeout=3)
        for c in conns:
            c.close()
        if broker is not None:
            try:
                broker.stop()
            except Exception:  # noqa: BLE001 - report, then keep cleaning up
                traceback.print_exc()
        shutil.rmtree(workdir, ignore_errors=True)


def _kernel_ticks(broker_pids: list[int], sub_pids: list[int]) -> list[tuple[float, float]]:
    out = []
    for pids in (broker_pids, sub_pids):
        times = [procfs.user_system_seconds(p) for p in pids]
        out.append((sum(t[0] for t in times), sum(t[1] for t in times)))
    return out


def _summarize(
    base: dict[str, Any],
    *,
    has_broker: bool,
    delivered: int,
    expected: int,
    first_ns: int,
    published_ns: int,
    last_ns: int,
    broker_cpu: float,
    sub_cpu: float,
    pub_cpu: float,
    rss_kib: int,
    latencies: array[int],
) -> dict[str, Any]:
    elapsed = max(1, last_ns - first_ns) / 1e9
    per_m = 1e6 / max(delivered, 1)
    worker_cpu = sub_cpu + pub_cpu
    res: dict[str, Any] = {
        **base,
        "ok": True,
        "delivered": delivered,
        "expected": expected,
        "lost": expected - delivered,
        "elapsed_s": round(elapsed, 4),
        "publish_s": round((published_ns - first_ns) / 1e9, 4),
        "deliveries_per_s": round(delivered / elapsed, 1),
        "total_cpu_s": round(broker_cpu + worker_cpu, 3),
        "total_cpu_s_per_M": round((broker_cpu + worker_cpu) * per_m, 3),
        # where the whole-system CPU goes: receiving side and publishing side
        "sub_cpu_s_per_M": round(sub_cpu * per_m, 3),
        "pub_cpu_s_per_M": round(pub_cpu * per_m, 3),
    }
    if has_broker:
        res["broker_cpu_s"] = round(broker_cpu, 3)
        res["broker_cpu_s_per_M"] = round(broker_cpu * per_m, 4)
        res["broker_peak_rss_mib"] = round(rss_kib / 1024, 1)
    if latencies:
        ordered = sorted(latencies)
        res["lat_p50_us"] = round(percentile(ordered, 0.50) / 1e3, 1)
        res["lat_p99_us"] = round(percentile(ordered, 0.99) / 1e3, 1)
        res["lat_max_us"] = round(ordered[-1] / 1e3, 1)
        res["lat_samples"] = len(ordered)
    return res


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every numeric metric's median over the successful runs of one configuration."""
    ok = [r for r in runs if r.get("ok")]
    out = {k: v for k, v in runs[0].items() if k not in ("ok", "error")}
    out["runs_ok"] = len(ok)
    out["runs"] = len(runs)
    if not ok:
        out["error"] = runs[-1].get("error")
        out["unavailable"] = bool(runs[-1].get("unavailable"))
        return out
    fixed = {"n_subs", "n_pubs", "events", "rate", "rep", "attempt"}
    for key in set().union(*(r.keys() for r in ok)) - fixed:
        values = [r[key] for r in ok if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        if values:
            out[key] = statistics.median(values)
    return out
