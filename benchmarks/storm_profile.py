"""Where a uvicorn worker's CPU goes under the seed experiment's storm (py-spy per process).

    python benchmarks/storm_profile.py [--routes none,shm-poll,workerbus,workerbus-embedded]
        [--storm 1000/0.1] [--out /tmp/wbstorm] [--rate 200]

Runs one measured window of the seed experiment (:func:`shared.tools.bench.seed.run_once`) per
route and, while ``wrk`` loads the servers, samples every uvicorn worker and the broker
process with ``py-spy record --nonblocking`` (the sampler does not pause the process it
measures). Then prints, per route, each worker's share of samples per function group (a
stack counts in the first group, top to bottom, found on it) as a Markdown table: what
docs/benchmarks.md "Where the storm goes (profile)" shows. Needs py-spy (the bench extra)
and wrk; run as root or with ptrace allowed.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import shutil
import subprocess
import sys
from typing import Any

from shared.tools.bench import seed

#: (group, text on the stack); the first match wins, so the most specific come first.
GROUPS = [
    ("the handler (count, note the delay)", "_Worker.on_event"),
    ("embedded broker: read + route", "Broker._read_loop"),
    ("embedded broker: writers", "Broker._write_loop"),
    ("embedded broker: other", "shared/broker.py"),
    ("decode and check (Client._decoded)", "Client._decoded"),
    ("dispatch (Dispatcher.run)", "Dispatcher.run"),
    ("read: socket + frames (Client._read_loop)", "Client._read_loop"),
    ("client writer (Client._write_loop)", "Client._write_loop"),
    ("publish: the storm loop", "_Worker.storm"),
    ("shm: poll, decode", "poll (shared/bench/seedapp.py"),
    ("the benchmark's count files", "report_counts"),
    ("HTTP: uvicorn, h11, the app", "uvicorn/protocols"),
    ("HTTP: uvicorn, h11, the app", "h11/"),
]
OTHER = "event loop, other"


def group_shares(path: str) -> tuple[collections.Counter[str], int]:
    """Samples per group in one ``py-spy --format raw`` file (one process)."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not n.isdigit():
                continue
            total += int(n)
            counts[next((g for g, text in GROUPS if text in stack), OTHER)] += int(n)
    return counts, total


def _children() -> list[int]:
    pids = []
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        try:
            with open(f"/proc/{os.getpid()}/task/{task}/children") as f:
                pids += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return pids


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read().replace("\0", " ")
    except OSError:
        return ""


def profile_routes(
    routes: list[str], storm: seed.Storm, out: str, rate: int, duration: float
) -> dict[str, Any]:
    py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    real_run = subprocess.run
    current = {"route": ""}

    def run(argv: Any, *args: Any, **kwargs: Any) -> Any:
        if not (isinstance(argv, list) and argv and argv[0] == "wrk"):
            return real_run(argv, *args, **kwargs)
        spies = []
        for pid in _children():  # only this process's own servers and broker
            cmd = _cmdline(pid)
            role = "broker" if "shared.tools.cli" in cmd else "server" if "seedserve" in cmd else None
            if role is None:
                continue
            path = os.path.join(out, f"{current['route']}-{role}-{pid}.txt")
            spies.append(subprocess.Popen(
                [py_spy, "record", "--nonblocking", "-r", str(rate), "--format", "raw",
                 "-d", f"{duration:g}", "-p", str(pid), "-o", path],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))  # fmt: skip
        try:
            return real_run(argv, *args, **kwargs)
        finally:
            for spy in spies:
                spy.wait(timeout=duration + 30)

    settings = seed.SeedSettings(storms=[storm], duration=duration)
    results = {}
    # seed.py calls subprocess.run(): patched for this process while the windows run
    setattr(subprocess, "run", run)  # noqa: B010
    try:
        for route in routes:
            current["route"] = route
            results[route] = seed.run_once(settings, route, None if route == "none" else storm)
    finally:
        setattr(subprocess, "run", real_run)  # noqa: B010
    return results


def table(out: str, routes: list[str], rate: int, duration: float) -> str:
    shares: dict[str, collections.defaultdict[str, float]] = {}
    busy: dict[str, list[float]] = {}
    for route in routes:
        acc: collections.defaultdict[str, float] = collections.defaultdict(float)
        files = sorted(glob.glob(os.path.join(out, f"{route}-server-*.txt")))
        busy[route] = []
        for path in files:
            counts, total = group_shares(path)
            busy[route].append(total / (rate * duration))
            for g, n in counts.items():
                acc[g] += n / total / len(files)  # mean of the workers' shares
        shares[route] = acc
    names = list(dict.fromkeys([g for g, _ in GROUPS] + [OTHER]))
    lines = ["| function group | " + " | ".join(routes) + " |", "|---|" + "---:|" * len(routes)]
    lines.append("| worker busy (share of one core) | "
                 + " | ".join(" / ".join(f"{100 * b:.0f} %" for b in busy[r]) for r in routes) + " |")  # fmt: skip
    lines.extend(
        f"| {g} | "
        + " | ".join(f"{100 * shares[r][g]:.1f}" if shares[r][g] else "–" for r in routes)
        + " |"
        for g in names
        if any(shares[r][g] for r in routes)
    )
    not_events = ("HTTP", "event loop", "the benchmark")
    lines.append("| **all event work** | " + " | ".join(
        f"**{100 * sum(v for g, v in shares[r].items() if not g.startswith(not_events)):.1f}**" for r in routes) + " |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--routes", default="none,shm-poll,workerbus,workerbus-embedded")
    ap.add_argument(
        "--storm", default="1000/0.1", help="events per burst per worker / seconds between"
    )
    ap.add_argument("--out", default="/tmp/wbstorm")
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    ap.add_argument("--duration", type=float, default=5.0)
    args = ap.parse_args()
    why = seed.unavailable()
    if why:
        sys.exit(f"storm_profile: {why}")
    routes = args.routes.split(",")
    burst, _, every = args.storm.partition("/")
    os.makedirs(args.out, exist_ok=True)
    results = profile_routes(
        routes, seed.Storm("storm", int(burst), float(every)), args.out, args.rate, args.duration
    )
    failed = False
    for route, r in results.items():
        if not r.get("ok"):
            failed = True
            print(f"{route}: FAILED: {r.get('error')}", file=sys.stderr)
            continue
        print(f"{route}: {r['requests_per_s']:,.0f} req/s, HTTP p99 {r.get('latency_p99_ms')} ms, "
              f"events {r['received_per_s']:,.0f}/s, delay p50 {r.get('event_delay_p50_ms')} ms, "
              f"background CPU {r['background_cpu_pct']} %")  # fmt: skip
    print()
    print(table(args.out, [r for r in routes if results[r].get("ok")], args.rate, args.duration))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
