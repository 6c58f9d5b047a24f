"""CPU per wake-up of every process of the latency test: where a burst's latency goes.

    python benchmarks/lat_wakeups.py [SCENARIO,..] [--reps 3] [--rate 10000] [--duration 2]
                                     [--subs 4] [--strace DIR] [--json PATH --tag NAME]

Runs the bench's fixed-rate latency test (``workerbus bench --tests lat``: one publisher,
``--subs`` subscribers, ~10 events per 1 ms tick) for each scenario in turn, ``--reps``
rounds alternated, and reads each process's CPU time and context switches from /proc
before and after the measured part. At this rate a process sleeps between bursts, so its
voluntary context switches count its wake-ups; CPU per wake-up is what it puts in front of
the processes queued behind it for one of the cores (with 6 processes on 2 cores the last
subscriber's latency is roughly the sum of those ahead of it).

``--strace DIR`` attaches ``strace -c -f`` to every process for the measured part and
writes DIR/<scenario>-<role>.txt (syscalls per process; the run's latency and CPU are then
meaningless: ptrace slows every syscall down).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

from shared.tools.bench import fanout, procfs


def _threads_status(pid: int) -> tuple[int, int]:
    vol = nonvol = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0, 0
    for tid in tids:
        v, n = _status_path(f"/proc/{pid}/task/{tid}/status")
        vol += v
        nonvol += n
    return vol, nonvol


def _status_path(path: str) -> tuple[int, int]:
    vol = nonvol = 0
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    vol = int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    nonvol = int(line.split()[1])
    except OSError:
        pass
    return vol, nonvol


class _Probe:
    """Patched into fanout's procfs calls: the harness reads every process's CPU in the
    order broker, subscribers, publishers, right before "go" and right after "done"."""

    def __init__(self, n_subs: int, strace_dir: str | None, scenario: str) -> None:
        self.n_subs = n_subs
        self.order: list[int] = []
        self.snaps: list[dict[int, tuple[float, int, int]]] = [{}, {}]
        self.phase = 0
        self.strace_dir = strace_dir
        self.scenario = scenario
        self.tracers: list[subprocess.Popen[bytes]] = []
        self.real_cpu = procfs.cpu_seconds
        self.real_machine = procfs.machine_sample

    def cpu_seconds(self, pid: int) -> float:
        cpu = self.real_cpu(pid)
        if self.phase == 0:
            self.order.append(pid)
        vol, nonvol = _threads_status(pid)
        self.snaps[min(self.phase, 1)][pid] = (cpu, vol, nonvol)
        return cpu

    def roles(self) -> dict[int, str]:
        # broker pid(s) first, then n_subs subscribers, then the publishers
        n_pubs = 1
        pids = self.order
        n_broker = len(pids) - self.n_subs - n_pubs
        out: dict[int, str] = {}
        for i, pid in enumerate(pids):
            if i < n_broker:
                out[pid] = "broker"
            elif i < n_broker + self.n_subs:
                out[pid] = f"sub{i - n_broker}"
            else:
                out[pid] = "pub"
        return out

    def machine_sample(self) -> procfs.MachineSample:
        if self.phase == 0:
            self.phase = 1  # (the "before" reads are done: fanout reads cpu, then machine)
            if self.strace_dir:
                for pid, role in self.roles().items():
                    out = os.path.join(self.strace_dir, f"{self.scenario}-{role}.txt")
                    self.tracers.append(
                        subprocess.Popen(
                            ["strace", "-c", "-f", "-o", out, "-p", str(pid)],
                            stderr=subprocess.DEVNULL,
                        )
                    )
                time.sleep(1.0)  # attached before "go"
                # the attach took a while: take the "before" figures again
                for pid in self.order:
                    self.snaps[0][pid] = (self.real_cpu(pid), *_threads_status(pid))
        else:
            for tr in self.tracers:
                tr.send_signal(signal.SIGINT)
            for tr in self.tracers:
                tr.wait(timeout=10)
            self.tracers.clear()
        return self.real_machine()


def run(scenario: str, args: argparse.Namespace) -> dict[str, Any]:
    probe = _Probe(args.subs, args.strace, scenario)
    real_cpu, real_machine = procfs.cpu_seconds, procfs.machine_sample
    procfs.cpu_seconds = probe.cpu_seconds
    procfs.machine_sample = probe.machine_sample
    try:
        events = int(args.rate * args.duration)
        res = fanout.run_one(
            scenario, test="lat", n_subs=args.subs, n_pubs=1, events=events, rate=args.rate, timeout=120
        )
    finally:
        procfs.cpu_seconds, procfs.machine_sample = real_cpu, real_machine
    if not res.get("ok"):
        return res
    per10 = args.rate * args.duration / 10  # CPU per 10 events: one nominal 1 ms tick
    per: dict[str, dict[str, float]] = {}
    for pid, role in probe.roles().items():
        c0, v0, n0 = probe.snaps[0][pid]
        c1, v1, n1 = probe.snaps[1].get(pid, probe.snaps[0][pid])
        wake = max(v1 - v0, 1)
        per[role] = {
            "cpu_ms": (c1 - c0) * 1e3,
            "wakeups": v1 - v0,
            "preempted": n1 - n0,
            "us_per_wakeup": (c1 - c0) * 1e6 / wake,
            "us_per_burst": (c1 - c0) * 1e6 / per10,
        }
    res["per_process"] = per
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("scenarios", nargs="?", default="workerbus-stream-asyncio,limit-raw-uds")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rate", type=float, default=10_000)
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--subs", type=int, default=4)
    ap.add_argument("--strace", metavar="DIR")
    ap.add_argument("--json", metavar="PATH", help="append every run (JSON lines), with --tag")
    ap.add_argument("--tag", default="", help="what this run measures (e.g. a tree), in --json")
    args = ap.parse_args()
    if args.strace:
        os.makedirs(args.strace, exist_ok=True)
    scenarios = args.scenarios.split(",")
    table: dict[str, list[dict[str, Any]]] = {s: [] for s in scenarios}
    for _ in range(args.reps):
        for s in scenarios:
            res = run(s, args)
            if not res.get("ok"):
                print(f"{s}: FAILED {res.get('error')}", file=sys.stderr)
                continue
            table[s].append(res)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({"tag": args.tag, "at": time.time(), **res}) + "\n")
            per = res["per_process"]
            subs = [v for k, v in per.items() if k.startswith("sub")]
            print(
                f"{s:26s} p50 {res['lat_p50_us']:6.0f} p99 {res['lat_p99_us']:6.0f} us  bg {res['background_cpu_pct']:4.1f}%  "
                + "  ".join(
                    f"{k} {v['us_per_wakeup']:5.1f}us/w {v['wakeups']:5d}w {v['us_per_burst']:5.1f}us/b"
                    for k, v in per.items()
                    if not k.startswith("sub") or k == "sub0"
                )
                + f"  subs avg {statistics.mean(v['us_per_burst'] for v in subs):5.1f}us/b",
                flush=True,
            )
    print("\nmedians (per process: CPU per wake-up, wake-ups, CPU per 1 ms burst)")
    for s, runs in table.items():
        if not runs:
            continue
        p50 = statistics.median(r["lat_p50_us"] for r in runs)
        p99 = statistics.median(r["lat_p99_us"] for r in runs)
        bg = [r["background_cpu_pct"] for r in runs]
        print(f"{s}: p50 {p50:.0f} us, p99 {p99:.0f} us, background {min(bg):.0f}-{max(bg):.0f} %")
        roles = ["broker", "pub", "sub"]
        for role in roles:
            vals = [
                v
                for r in runs
                for k, v in r["per_process"].items()
                if (k == role if role != "sub" else k.startswith("sub"))
            ]
            if not vals:
                continue
            print(
                f"  {role:6s} {statistics.median(v['us_per_wakeup'] for v in vals):6.1f} us/wake-up  "
                f"{statistics.median(v['wakeups'] for v in vals):6.0f} wake-ups  "
                f"{statistics.median(v['us_per_burst'] for v in vals):6.1f} us/burst  "
                f"{statistics.median(v['preempted'] for v in vals):5.0f} preempted"
            )


if __name__ == "__main__":
    main()
