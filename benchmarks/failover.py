"""Failover benchmark: ``kill -9`` the worker hosting the embedded broker, again and again.

    python -m benchmarks.failover                       # 16 workers, 100 kills, http
    python -m benchmarks.failover --workers 4 16 --transport http stream --json fo.json

Each worker is a real process that joins with :func:`shared.embed.join` and reports on its
stdout (one JSON object per line) every ``welcome`` it gets, with ``time.monotonic()``
(one clock for every process of the machine). Per round the parent:

1. has every worker publish a numbered event to ``others`` every ``--interval`` seconds;
2. reads the host's pid from ``bus.sock.lock`` and sends it SIGKILL at ``t0``;
3. waits until every survivor was welcomed by a broker of a newer generation: the
   failover time is the latest of those moments minus ``t0``;
4. starts a replacement worker (as a server would; it claims the freed id);
5. stops the publishers, and counts per (publisher, receiver) pair of survivors which
   numbered events never arrived: those published while the publisher was disconnected
   (the gap; they sat in its buffer, so the aim is zero), and those the dead broker took
   with it (which the receivers' sequence checks should report as ``lost``).

Each round also records its phases (ms after the kill): ``detect`` (the median and the last
survivor's connection ends), ``lock`` (a survivor wins the election), ``listening`` (its
broker listens), ``welcomed`` (the median survivor is welcomed; the last one is the
failover time), ``flowing_last`` (every survivor's handler has had an event from another
worker through the new broker), and the background CPU during the failover (the machine's busy time that
is not the fleet's or this parent's), so that a slow round can be explained. The default
100 kills make p99 the second worst round rather than the worst; 100 kills of 16 workers
take about 4 minutes.

Not a test: it prints tables and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from typing import IO, Any

import anyio

from shared.election import lock_path
from shared.tools.bench import procfs

_DEADLINE = 20.0


# --- the worker process -------------------------------------------------------------------


async def _worker(address: str, workers: int, transport: str, interval: float) -> None:
    from shared.embed import join
    from shared.errors import BusError

    def emit(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    pid = os.getpid()
    received: dict[int, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    async with join(address, workers=workers, transport=transport) as bus:

        flowing: list[Any] = [None]  # the generation whose first bench event is awaited

        def on_event(data: Any, event: str, source: str, wid: int | None) -> None:
            if source == "workerbus" and event == "welcome":
                gen = data.get("broker", {}).get("generation")
                # the moment the welcome was read, not when this handler got to run
                emit({"type": "welcome", "gen": gen, "t": bus.welcomed_at, "pid": pid, "wid": bus.worker_id})
                flowing[0] = gen
            elif source == "bench" and isinstance(data, dict):
                received[data["r"]][data["pid"]].add(data["n"])
                if flowing[0] is not None:
                    # another worker's event reached this handler through the new broker
                    emit({"type": "flowing", "gen": flowing[0], "t": time.monotonic(), "pid": pid})
                    flowing[0] = None

        bus.subscribe("*", "*", on_event)
        stdin = anyio.wrap_file(sys.stdin)
        stop = anyio.Event()
        finished = anyio.Event()
        result: dict[str, Any] = {}

        async def publish(r: int, stop: anyio.Event) -> None:
            n = 0
            gap: list[int] = []
            refused = 0
            while not stop.is_set():
                n += 1
                if not bus.is_ready:
                    gap.append(n)
                try:
                    bus.publish_nowait("bench", "tick", {"r": r, "n": n, "pid": pid}, "others")
                except (anyio.WouldBlock, BusError):
                    refused += 1  # buffer full: counted, not part of the loss figures
                await anyio.sleep(interval)
            result.update(count=n, gap=gap, refused=refused)
            finished.set()

        async with anyio.create_task_group() as tg:
            lost_before = 0
            async for line in stdin:
                cmd, _, arg = line.strip().partition(" ")
                if cmd == "pub":
                    stop = anyio.Event()
                    finished = anyio.Event()
                    result.clear()
                    lost_before = bus.lost
                    tg.start_soon(publish, int(arg), stop)
                elif cmd == "end":
                    stop.set()
                    with anyio.move_on_after(5):
                        await finished.wait()
                        await bus.flush()
                    emit({"type": "published", "r": int(arg), "pid": pid, **result})
                elif cmd == "report":
                    r = int(arg)
                    got = {str(p): sorted(ns) for p, ns in received.pop(r, {}).items()}
                    # (getattr: benchmarks/failover_ab.py runs this against older trees)
                    phases = {
                        "lost_at": getattr(bus, "lost_at", None),
                        "welcomed_at": bus.welcomed_at,
                        "locked_at": getattr(bus.hosting, "locked_at", None),
                        "listening_at": getattr(bus.hosting, "listening_at", None),
                    }
                    emit({"type": "received", "r": r, "pid": pid, "from": got, "lost": bus.lost - lost_before,
                          "phases": phases})
                elif cmd == "quit":
                    break
            tg.cancel_scope.cancel()


def worker_main(argv: list[str]) -> None:
    address, workers, transport, interval = argv[0], int(argv[1]), argv[2], float(argv[3])
    # The parent reads the figures; the workers' own lost/reconnect warnings are expected.
    logging.basicConfig(level=logging.ERROR)
    anyio.run(_worker, address, workers, transport, interval)


# --- the parent ---------------------------------------------------------------------------


class _Proc:
    def __init__(self, args: list[str], lines: queue.Queue[dict[str, Any]]) -> None:
        self.popen = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.pid = self.popen.pid
        self.alive = True
        threading.Thread(target=self._read, args=(self.popen.stdout, lines), daemon=True).start()

    @staticmethod
    def _read(stream: IO[str] | None, lines: queue.Queue[dict[str, Any]]) -> None:
        assert stream is not None
        for line in stream:
            try:
                lines.put(json.loads(line))
            except ValueError:
                pass

    def send(self, line: str) -> None:
        if self.alive and self.popen.stdin is not None:
            try:
                self.popen.stdin.write(line + "\n")
                self.popen.stdin.flush()
            except (BrokenPipeError, OSError):
                pass


class Fleet:
    """N worker processes on one bus, with their reports gathered from a queue."""

    def __init__(self, workers: int, transport: str, interval: float) -> None:
        self.dir = tempfile.mkdtemp(prefix="wb-fo-")
        self.path = os.path.join(self.dir, "bus.sock")
        self.address = f"unix:{self.path}"
        self.workers = workers
        self.transport = transport
        self.interval = interval
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.procs: dict[int, _Proc] = {}
        self.generation: dict[int, int] = {}  # pid -> latest welcome generation
        self.backlog: list[dict[str, Any]] = []
        #: (pid, generation) -> when the worker's handler got its first event via that broker
        self.flowing: dict[tuple[int, int], float] = {}

    def spawn(self) -> _Proc:
        args = [sys.executable, "-m", "benchmarks.failover", "--worker", self.address,
                str(self.workers), self.transport, str(self.interval)]
        proc = _Proc(args, self.lines)
        self.procs[proc.pid] = proc
        return proc

    def live(self) -> list[_Proc]:
        return [p for p in self.procs.values() if p.alive]

    def _pump(self, timeout: float) -> dict[str, Any] | None:
        try:
            msg = self.lines.get(timeout=timeout)
        except queue.Empty:
            return None
        if msg.get("type") == "welcome" and isinstance(msg.get("gen"), int):
            self.generation[msg["pid"]] = max(msg["gen"], self.generation.get(msg["pid"], 0))
        elif msg.get("type") == "flowing" and isinstance(msg.get("gen"), int):
            self.flowing[(msg["pid"], msg["gen"])] = msg["t"]
        return msg

    def wait_for(self, predicate: Any, what: str, deadline: float = _DEADLINE) -> list[dict[str, Any]]:
        """Collect messages until ``predicate(collected)`` is true."""
        end = time.monotonic() + deadline
        got: list[dict[str, Any]] = []
        while not predicate(got):
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out waiting for {what}")
            msg = self._pump(min(left, 0.1))
            if msg is not None:
                got.append(msg)
        return got

    def host(self) -> tuple[int, int]:
        with open(lock_path(self.path)) as f:
            record = json.load(f)
        return int(record["pid"]), int(record["generation"])

    def settle(self) -> int:
        """Wait until every live worker is connected to the current broker."""
        end = time.monotonic() + _DEADLINE
        while time.monotonic() < end:
            try:
                pid, gen = self.host()
            except (OSError, ValueError, KeyError):
                gen = -1
            if gen > 0 and all(self.generation.get(p.pid) == gen for p in self.live()):
                return gen
            self._pump(0.05)
        raise TimeoutError("workers did not settle on one broker")

    def close(self) -> None:
        for p in self.live():
            p.send("quit")
        end = time.monotonic() + 5
        for p in self.procs.values():
            try:
                p.popen.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _fleet_cpu(pids: list[int]) -> dict[int, float]:
    return {pid: procfs.cpu_seconds(pid) for pid in pids}


def _ms(at: float | None, t0: float) -> float | None:
    return None if at is None or at < t0 else (at - t0) * 1000


def run_round(fleet: Fleet, r: int, warmup: float) -> dict[str, Any]:
    old_gen = fleet.settle()
    publishers = fleet.live()
    for p in publishers:
        p.send(f"pub {r}")
    time.sleep(warmup)
    host_pid, gen = fleet.host()
    assert gen == old_gen
    victim = fleet.procs[host_pid]
    survivors = [p for p in publishers if p is not victim]
    # CPU counters around the failover window: what the rest of the machine did meanwhile
    cpu0 = _fleet_cpu([p.pid for p in survivors])
    own0 = time.process_time()
    m0 = procfs.machine_sample()
    t0 = time.monotonic()
    os.kill(host_pid, signal.SIGKILL)
    victim.alive = False
    reconnected: dict[int, float] = {}

    def done(msgs: list[dict[str, Any]]) -> bool:
        for m in msgs:
            if m.get("type") == "welcome" and isinstance(m.get("gen"), int) and m["gen"] > old_gen:
                reconnected.setdefault(m["pid"], m["t"])
        return all(p.pid in reconnected for p in survivors)

    fleet.wait_for(done, f"round {r}: survivors reconnected")
    m1 = procfs.machine_sample()
    cpu1 = _fleet_cpu([p.pid for p in survivors])
    fleet_cpu = sum(cpu1[p] - cpu0[p] for p in cpu0) + (time.process_time() - own0)
    background, _steal = procfs.background_share(m0, m1, fleet_cpu)
    window = max(m1.at - m0.at, 1e-3)
    failover = max(reconnected[p.pid] for p in survivors) - t0
    victim.popen.wait()
    fleet.spawn()  # the server's respawn
    time.sleep(warmup)
    for p in survivors:
        p.send(f"end {r}")
    published = {
        m["pid"]: m
        for m in fleet.wait_for(
            lambda ms: sum(m.get("type") == "published" for m in ms) >= len(survivors),
            f"round {r}: publish counts",
        )
        if m.get("type") == "published"
    }
    time.sleep(0.3)  # let the last events arrive
    for p in survivors:
        p.send(f"report {r}")
    reports = [
        m
        for m in fleet.wait_for(
            lambda ms: sum(m.get("type") == "received" for m in ms) >= len(survivors),
            f"round {r}: receive reports",
        )
        if m.get("type") == "received"
    ]
    new_gen = fleet.host()[1]
    flowing = [fleet.flowing.get((p.pid, new_gen)) for p in survivors]
    expected = missing_gap = missing_other = gap_published = 0
    for rep in reports:
        for pub_pid, pub in published.items():
            if pub_pid == rep["pid"]:
                continue
            got = set(rep["from"].get(str(pub_pid), []))
            sent = set(range(1, pub["count"] + 1))
            gap = set(pub["gap"])
            missing = sent - got
            expected += len(sent)
            missing_gap += len(missing & gap)
            missing_other += len(missing - gap)
            gap_published += len(gap)
    return {
        "round": r,
        "failover_s": failover,
        "phases_ms": _phases(reports, reconnected, t0, flowing),
        "background_pct": round(background, 1),
        "fleet_cpu_pct": round(100 * fleet_cpu / (window * (os.cpu_count() or 1)), 1),
        "survivors": len(survivors),
        "events_expected": expected,
        "gap_events": gap_published,
        "gap_events_lost": missing_gap,
        "lost_in_dead_broker": missing_other,
        "lost_reported": sum(rep["lost"] for rep in reports),
        "refused": sum(p.get("refused", 0) for p in published.values()),
    }


#: The phases of a round, in order (ms after the kill).
PHASES = ("detect", "detect_last", "lock", "listening", "welcomed", "welcomed_last", "flowing_last")


def _phases(
    reports: list[dict[str, Any]], reconnected: dict[int, float], t0: float, flowing: list[float | None]
) -> dict[str, float | None]:
    lost = sorted(x for x in (_ms(rep["phases"]["lost_at"], t0) for rep in reports) if x is not None)
    welcomed = sorted((t - t0) * 1000 for t in reconnected.values())
    host = [rep["phases"] for rep in reports if _ms(rep["phases"]["listening_at"], t0) is not None]
    return {
        "detect": statistics.median(lost) if lost else None,
        "detect_last": lost[-1] if lost else None,
        "lock": _ms(host[0]["locked_at"], t0) if host else None,
        "listening": _ms(host[0]["listening_at"], t0) if host else None,
        "welcomed": statistics.median(welcomed),
        "welcomed_last": welcomed[-1],
        # every survivor's handlers got another worker's event through the new broker
        "flowing_last": None if None in flowing else (max(f for f in flowing if f is not None) - t0) * 1000,
    }


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))]


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "p90": _pct(values, 0.90),
        "p99": _pct(values, 0.99),
        "max": max(values),
    }


def bench(workers: int, kills: int, transport: str, interval: float, warmup: float) -> dict[str, Any]:
    fleet = Fleet(workers, transport, interval)
    started = time.monotonic()
    m0 = procfs.machine_sample()
    children0 = os.times()
    own0 = time.process_time()
    try:
        for _ in range(workers):
            fleet.spawn()
        rounds = [run_round(fleet, r, warmup) for r in range(1, kills + 1)]
    finally:
        fleet.close()
    # Every worker has been waited for now, so the children's times hold all of their CPU.
    children1 = os.times()
    own = (children1.children_user - children0.children_user) + (
        children1.children_system - children0.children_system
    ) + (time.process_time() - own0)
    m1 = procfs.machine_sample()
    background, steal = procfs.background_share(m0, m1, own)
    return {
        "workers": workers,
        "transport": transport,
        "publish_interval_s": interval,
        "seconds": round(time.monotonic() - started, 1),
        "background_pct": round(background, 1),
        "steal_pct": round(steal, 1),
        "fleet_cpu_pct": round(100 * own / (max(m1.at - m0.at, 1e-3) * (os.cpu_count() or 1)), 1),
        **summarize(rounds),
    }


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of a set of rounds (one run's, or several runs' merged)."""
    times = [x["failover_s"] * 1000 for x in rounds]
    phases = {
        name: _spread(values)
        for name in PHASES
        if (values := [v for x in rounds if (v := x["phases_ms"].get(name)) is not None])
    }
    return {
        "kills": len(rounds),
        "window_background_pct": _spread([x["background_pct"] for x in rounds]),
        "failover_median_ms": statistics.median(times),
        "failover_p90_ms": _pct(times, 0.90),
        "failover_p99_ms": _pct(times, 0.99),
        "failover_max_ms": max(times),
        "phases_ms": phases,
        "gap_events": sum(x["gap_events"] for x in rounds),
        "gap_events_lost": sum(x["gap_events_lost"] for x in rounds),
        "lost_in_dead_broker": sum(x["lost_in_dead_broker"] for x in rounds),
        "lost_reported": sum(x["lost_reported"] for x in rounds),
        "events_expected": sum(x["events_expected"] for x in rounds),
        "rounds": rounds,
    }


def print_result(res: dict[str, Any]) -> None:
    print(
        f"\n{res['workers']} workers, {res['transport']}, {res['kills']} kills, publishing every "
        f"{res['publish_interval_s'] * 1000:g} ms; {res['seconds']:.0f} s; background CPU "
        f"{res['background_pct']:.1f} % of the machine over the run (during the failovers: median "
        f"{res['window_background_pct']['median']:.0f} %, max {res['window_background_pct']['max']:.0f} %); "
        f"the fleet itself {res['fleet_cpu_pct']:.1f} %"
        + (f"; background before the run {bg:.0f} %" if (bg := res.get("background_before_pct")) is not None else "")
    )
    print(f"  {'ms after kill -9':<34} {'median':>7} {'p90':>7} {'p99':>7} {'max':>7}")
    labels = {
        "detect": "survivors notice (median)",
        "detect_last": "survivors notice (last)",
        "lock": "a survivor has the lock",
        "listening": "its broker listens",
        "welcomed": "survivors welcomed (median)",
        "welcomed_last": "last survivor welcomed = failover",
        "flowing_last": "events reach every survivor again",
    }
    for name in PHASES:
        spread = res["phases_ms"].get(name)
        if spread is not None:
            print(f"  {labels[name]:<34} " + " ".join(f"{spread[k]:>7.1f}" for k in ("median", "p90", "p99", "max")))
    print(
        f"  events: {res['events_expected']} expected, {res['gap_events']} published while disconnected "
        f"({res['gap_events_lost']} of them lost), {res['lost_in_dead_broker']} died with a broker, "
        f"{res['lost_reported']} reported lost",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["--worker"]:
        worker_main(args_list[1:])
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.failover", description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[16])
    p.add_argument("--kills", type=int, default=100, help="kills per run (>= 100 for a p99 that is not the max)")
    p.add_argument("--transport", choices=("http", "stream"), nargs="+", default=["http"])
    p.add_argument("--interval", type=float, default=0.005, help="seconds between a worker's publishes")
    p.add_argument("--warmup", type=float, default=0.3, help="seconds of publishing before a kill and after")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each run, wait up to this long for the machine's background CPU to drop "
                   "to --max-bg (as workerbus bench does)")
    p.add_argument("--max-bg", type=float, default=10.0, metavar="PCT")
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(args_list)
    if args.kills < 1:
        p.error("--kills must be at least 1")
    results = []
    for n in args.workers:
        for transport in args.transport:
            idle = procfs.wait_until_idle(args.wait_idle, args.max_bg) if args.wait_idle > 0 else None
            res = bench(n, args.kills, transport, args.interval, args.warmup)
            res["background_before_pct"] = idle
            results.append(res)
            print_result(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python -m benchmarks.failover " + " ".join(args_list),
                       "cpus": os.cpu_count(), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
