"""The whole benchmark: which runs, in which order, repeated, on a quiet machine.

Every configuration is measured ``reps`` times and reported as the median. All latency
runs come before all floods (a flood right before a latency run inflates its tail), and the
seed experiment comes last. The machine may be shared: before starting, the runner waits
for it to be idle; a run during which other processes used more than ``max_bg`` % of the
CPU is measured again after a pause (up to ``retries`` times, keeping the quietest), and
every attempt stays in the JSON with ``used`` telling which ones the medians rest on.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from shared.tools.progress import Progress

from . import procfs
from .fanout import median_of, run_one
from .machine import describe_machine
from .peers import PEERS, make_peer
from .subset import run_subset

__all__ = ["Settings", "estimate_seconds", "plan_runs", "run_benchmark"]


@dataclass
class Settings:
    scenarios: list[str] = field(default_factory=lambda: list(PEERS))
    tests: list[str] = field(default_factory=lambda: ["lat", "thr"])
    subs: list[int] = field(default_factory=lambda: [1, 4, 16])
    pubs: list[int] = field(default_factory=lambda: [1, 4])
    lat_subs: list[int] = field(default_factory=lambda: [4])
    lat_pubs: list[int] = field(default_factory=lambda: [1])
    #: events per flood run, over all publishers
    events: int = 100_000
    #: caps events so that events * N stays below this (keeps N=16 runs short)
    max_deliveries: int = 800_000
    #: events/s of the latency test, over all publishers
    rate: float = 10_000.0
    #: seconds of the latency test
    duration: float = 2.0
    reps: int = 3
    timeout: float = 90.0
    #: seconds after which no further run is started (the rest is reported as skipped)
    budget: float = 1800.0
    wait_idle: float = 60.0
    max_bg: float = 10.0
    retries: int = 2
    retry_wait: float = 20.0
    seed: bool = True
    #: the "subset" scenario (issue #14): workers that handle a part of the events
    subset: bool = True
    seed_options: dict[str, Any] = field(default_factory=dict)


Run = tuple[str, str, int, int, int]  # scenario, test, N, P, events


def plan_runs(s: Settings) -> list[Run]:
    runs: list[Run] = []
    for test in s.tests:
        subs = s.subs if test == "thr" else s.lat_subs
        pubs = s.pubs if test == "thr" else s.lat_pubs
        for name in s.scenarios:
            peer = make_peer(name)
            scale = peer.events_scale
            for p in pubs:
                for n in subs:
                    if test == "thr":
                        events = int(min(s.events, s.max_deliveries // n) * scale)
                        events = max(events, 100 * p)
                    else:
                        events = int((peer.lat_rate or s.rate) * s.duration)
                    runs.append((name, test, n, p, events))
    return runs


def estimate_seconds(s: Settings, run: Run) -> float:
    """A guess of a run's wall time on a small machine, for the time-left estimate only.

    The progress line rescales it by the speed measured as runs finish, so only the
    proportions between runs matter.
    """
    _, test, n, _, events = run
    # ~1.5 s to start the broker and the subscriber processes, then the measured part
    measured = s.duration if test == "lat" else events * n / 400_000
    return s.reps * (1.5 + measured)


def _log(line: str, progress: Progress | None = None) -> None:
    if progress is not None:
        progress.print(line)
    else:
        print(line, file=sys.stderr, flush=True)


def _measure(s: Settings, run: Run, started: float, raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    name, test, n, p, events = run
    rate = make_peer(name).lat_rate or s.rate
    used: list[dict[str, Any]] = []
    for rep in range(s.reps):
        best: dict[str, Any] | None = None
        for attempt in range(1 + s.retries):
            if time.monotonic() - started > s.budget:
                break
            r = run_one(name, test=test, n_subs=n, n_pubs=p, events=events, rate=rate, timeout=s.timeout)
            r.update(rep=rep, attempt=attempt, used=False)
            raw.append(r)
            if r.get("unavailable"):
                best = r
                break
            quieter = best is None or (
                r.get("ok")
                and (not best.get("ok") or r.get("background_cpu_pct", 0) < best.get("background_cpu_pct", 0))
            )
            if quieter:
                best = r
            if not r.get("ok") or r.get("background_cpu_pct", 0) <= s.max_bg or attempt == s.retries:
                break
            # Somebody else was busy during the run: wait for quiet, then measure again.
            procfs.wait_until_idle(s.retry_wait, s.max_bg)
        if best is None:
            best = {"scenario": name, "test": test, "n_subs": n, "n_pubs": p, "events": events,
                    "ok": False, "error": "skipped: --budget exhausted"}  # fmt: skip
        best["used"] = True
        used.append(best)
        if best.get("unavailable"):
            break  # no point repeating a scenario that cannot run here
    return used


def _progress(k: int, total: int, elapsed: float, m: dict[str, Any]) -> str:
    head = f"[{k}/{total} {elapsed:6.0f}s] {m['scenario']:24s} {m['test']} N={m['n_subs']:<2d} P={m['n_pubs']} "
    if not m.get("runs_ok"):
        return head + f"FAILED: {str(m.get('error'))[:300]}"
    line = head + f"{m['deliveries_per_s']:>11,.0f} deliveries/s"
    if m["test"] == "lat":
        line += f"  p50 {m['lat_p50_us']:>8,.0f} µs  p99 {m['lat_p99_us']:>8,.0f} µs"
    line += f"  lost {m.get('lost', 0):,.0f}  bg {m.get('background_cpu_pct', 0):.0f}%"
    return line + f"  ok {m['runs_ok']}/{m['runs']}"


def run_benchmark(
    s: Settings,
    *,
    seed_runner: Callable[[Settings], dict[str, Any]] | None = None,
    command: str = "",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run everything ``s`` asks for; return the JSON-ready report.

    ``progress`` (made for :func:`plan_runs`' runs, then the seed runner's) is told when
    each run starts and ends, and carries the log lines.
    """
    scenarios = {}
    for name in s.scenarios:
        peer = make_peer(name)
        scenarios[name] = {"description": peer.describe(), "unavailable": peer.unavailable()}
        if scenarios[name]["unavailable"]:
            _log(f"skipping {name}: {scenarios[name]['unavailable']}", progress)
    if progress is not None and s.wait_idle > 0:
        progress.note(f"waiting up to {s.wait_idle:g} s for other processes to use < {s.max_bg:g} % CPU …")
    idle_before = procfs.wait_until_idle(s.wait_idle, s.max_bg) if s.wait_idle > 0 else None
    started = time.monotonic()
    runs = plan_runs(s)
    medians: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []
    for k, run in enumerate(runs, 1):
        if progress is not None:
            name, test, n, p, _ = run
            progress.start(f"{name} {test} N={n} P={p}")
        m = median_of(_measure(s, run, started, raw))
        medians.append(m)
        if progress is not None:
            progress.done()
        _log(_progress(k, len(runs), time.monotonic() - started, m), progress)
    subset = None
    if s.subset:
        if progress is not None:
            progress.start("subset: 16 workers each on 1 of 8 sources, workerbus and limit-raw-uds alternating")
        subset = run_subset(s.events, reps=s.reps)
        if progress is not None:
            progress.done()
        _log(_subset_line(subset), progress)
    seed = seed_runner(s) if (s.seed and seed_runner is not None) else None
    meta = describe_machine()
    meta["background_cpu_pct_before"] = idle_before
    return {
        "meta": meta,
        "command": command,
        "settings": asdict(s),
        "wall_s": round(time.monotonic() - started, 1),
        "scenarios": scenarios,
        "fanout": {"medians": medians, "runs": raw},
        "subset": subset,
        "seed": seed,
    }


def _subset_line(r: dict[str, Any]) -> str:
    wb = r["workerbus"]
    if not wb.get("ok"):
        return f"subset: FAILED: {wb.get('error')}"
    return (
        f"subset: {wb['cpu_s_per_million_handled']} CPU s per M handled events "
        f"({r['cpu_vs_raw'] if r['cpu_vs_raw'] is not None else '–'}× limit-raw-uds); publish-only client "
        f"{wb['publish_only_client_cpu_s']} s vs subscribed {wb['everything_client_cpu_s']} s"
    )
