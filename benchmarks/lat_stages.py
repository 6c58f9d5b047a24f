"""Where an event of the fan-out latency test waits: publish → writer → broker → handler.

    python benchmarks/lat_stages.py [--peer workerbus-stream-asyncio] [--subs 4] [--reps 1]
    python benchmarks/lat_stages.py --analyse DIR

Runs ``workerbus bench --tests lat`` for one workerbus scenario with
``benchmarks/lat_trace/sitecustomize.py`` on the processes' ``PYTHONPATH`` (timestamps at
every frame-stream send and receive and at every handler call; see there), then prints the
age of a burst's oldest and newest event at each stage (p50 / p90 / p99, µs), the spread
of one burst's broker writes and subscriber reads, and the handler latency. The clock is
``time.monotonic_ns``, one clock for every process of the machine. Tracing adds a decode
of every traced frame, so absolute figures are a little higher than the bench's own.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)

#: (what, kind) of a record -> the stage it marks
_STAGES = {
    ("send", "env"): "1 publisher writes",
    ("recv", "env"): "2 broker reads",
    ("send", "ev"): "3 broker writes (each subscriber)",
    ("recv", "ev"): "4 subscriber reads",
    ("handled", "ev"): "5 handler called",
}


def _pct(values: list[int], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] / 1e3


def analyse(directory: str) -> list[str]:
    records: list[tuple[str, str, int, int, int, int]] = []
    for path in glob.glob(os.path.join(directory, "trace-*.jsonl")):
        with open(path) as f:
            records += [tuple(json.loads(line)) for line in f]
    ticks = [r for r in records if r[0] == "handled"]
    if not ticks:
        raise RuntimeError(f"no handled ticks traced in {directory}")
    # the measured window only: ticks published after the first 10 % of the run
    first = min(r[3] for r in ticks)
    last = max(r[3] for r in ticks)
    start = first + (last - first) // 10
    oldest: dict[str, list[int]] = defaultdict(list)
    newest: dict[str, list[int]] = defaultdict(list)
    by_burst: dict[tuple[str, int], list[int]] = defaultdict(list)
    for what, kind, t, lo, hi, _n in records:
        stage = _STAGES.get((what, kind))
        if stage is None or lo < start:
            continue
        oldest[stage].append(t - lo)
        newest[stage].append(t - hi)
        by_burst[(stage, lo)].append(t)
    lines = [f"{'stage':36} {'oldest p50/p90/p99 µs':>24} {'newest p50/p90/p99 µs':>24} {'n':>6}"]
    for stage in sorted(oldest):
        o, n = oldest[stage], newest[stage]
        lines.append(
            f"{stage:36} {_pct(o, .5):8.0f}{_pct(o, .9):8.0f}{_pct(o, .99):8.0f} "
            f"{_pct(n, .5):8.0f}{_pct(n, .9):8.0f}{_pct(n, .99):8.0f} {len(o):6}"
        )
    for stage in ("3 broker writes (each subscriber)", "4 subscriber reads"):
        spread = [max(ts) - min(ts) for (s, _), ts in by_burst.items() if s == stage and len(ts) > 1]
        if spread:
            lines.append(
                f"spread of one burst's {stage[2:]:26} p50 {_pct(spread, .5):.0f} p90 "
                f"{_pct(spread, .9):.0f} p99 {_pct(spread, .99):.0f} µs"
            )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer", default="workerbus-stream-asyncio")
    ap.add_argument("--subs", default="4")
    ap.add_argument("--reps", default="1")
    ap.add_argument("--analyse", metavar="DIR", help="only analyse an existing trace directory")
    ap.add_argument("--keep", metavar="DIR", help="write the traces here (kept)")
    ap.add_argument("--tree", default=_ROOT, help="run the workerbus of this source tree (A/B)")
    args = ap.parse_args()
    if args.analyse:
        print("\n".join(analyse(args.analyse)))
        return
    directory = args.keep or tempfile.mkdtemp(prefix="lat-trace-")
    os.makedirs(directory, exist_ok=True)
    env = dict(os.environ)
    env["WB_LAT_TRACE"] = directory
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.join(_HERE, "lat_trace"), args.tree, env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    cmd = [
        sys.executable, "-m", "shared.tools.cli", "bench", "--peers", args.peer, "--tests", "lat",
        "--lat-subs", args.subs, "--reps", args.reps, "--no-seed", "--no-subset", "--wait-idle", "0",
        "--retries", "0",
    ]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, cwd=args.tree, stdout=subprocess.DEVNULL)
    print("\n".join(analyse(directory)))


if __name__ == "__main__":
    main()
