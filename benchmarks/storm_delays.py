"""Where an event of the seed experiment's storm waits: post → broker → worker → handler.

    python benchmarks/storm_delays.py [--routes workerbus,workerbus-embedded] [--storm 1000/0.1]
        [--hops] [--out DIR]

Runs one measured window of the seed experiment per route with
``benchmarks/storm_trace/sitecustomize.py`` on the processes' ``PYTHONPATH`` (it
timestamps the broker's reads, the clients' decode chunks and the handler calls; see
there), then prints per route the stages of an event's delay (p50, some p90). The clock is
``time.monotonic_ns``, one clock for every process of the machine. The first 1.5 s of
handling are left out (start-up). ``--hops`` adds, per (publisher -> receiver) pair of
workers, the p50 of each hop of a sample of events (post -> the broker routes its read ->
written to the receiver -> the receiver's read -> handler); ``--out`` keeps the traces.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
from typing import Any

from shared.tools.bench import seed

_HERE = os.path.dirname(os.path.abspath(__file__))


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def analyse(directory: str) -> dict[str, float]:
    """The delay stages of one route's traces, in ms."""
    reads: list[list[int]] = []
    handled: list[list[int]] = []
    chunk_files: list[list[list[int]]] = []
    for path in glob.glob(os.path.join(directory, "trace-*.json")):
        with open(path) as f:
            rec = json.load(f)
        reads += rec["broker_reads"]
        handled += rec["handled"]
        chunk_files.append(rec["client_chunks"])
    if not handled:
        raise RuntimeError(f"no handled events traced in {directory}")
    start = min(h[1] for h in handled) + 1_500_000_000
    reads = [r for r in reads if r[0] > start]
    handled = [h for h in handled if h[1] > start]
    firsts: list[float] = []
    gaps: list[float] = []
    for chunks in chunk_files:
        chunks = [c for c in chunks if c[0] > start]
        for a, b in zip(chunks, chunks[1:], strict=False):
            # the next chunk of the same read: a full chunk before it, its posts right after
            if a[1] == 256 and 0 <= b[2] - a[3] < 500_000:
                gaps.append(b[0] - a[0])
            else:
                firsts.append(b[0] - b[2])
    ms = 1e-6
    return {
        "posts of one read, first to last, p50": _pct([r[3] - r[2] for r in reads], 0.5) * ms,
        "posts of one read, first to last, p90": _pct([r[3] - r[2] for r in reads], 0.9) * ms,
        "events per broker read, p50": _pct([r[1] for r in reads], 0.5),
        "newest event's age at the broker's read, p50": _pct([r[0] - r[3] for r in reads], 0.5)
        * ms,
        "oldest event's age at the broker's read, p50": _pct([r[0] - r[2] for r in reads], 0.5)
        * ms,
        "age at the decode of a read's first chunk, p50": _pct(firsts, 0.5) * ms,
        "gap between chunks of one read, p50": _pct(gaps, 0.5) * ms,
        "gap between chunks of one read, p90": _pct(gaps, 0.9) * ms,
        "handled, p50": _pct([h[1] - h[0] for h in handled], 0.5) * ms,
        "handled, p99": _pct([h[1] - h[0] for h in handled], 0.99) * ms,
    }


def hops(directory: str) -> dict[str, dict[str, float]]:
    """Per (publisher -> receiver) worker pair, p50 of each hop of a sample of handled
    events, in ms: post -> the broker starts routing its read -> routed -> written to the
    receiver -> the receiver decodes the chunk that holds it -> its handler runs."""
    import bisect

    routed: dict[Any, list[list[int]]] = {}
    writes: dict[Any, list[list[int]]] = {}
    chunks: dict[Any, list[list[int]]] = {}
    handled: list[list[Any]] = []
    host = None
    for path in glob.glob(os.path.join(directory, "trace-*.json")):
        with open(path) as f:
            rec = json.load(f)
        if rec.get("routed"):
            host = rec["me"][0][0] if rec.get("me") else "?"
        for r in rec.get("routed", []):
            routed.setdefault(r[2], []).append(r)
        for w in rec.get("writes", []):
            writes.setdefault(w[1], []).append(w)
        for c in rec["client_chunks"]:
            chunks.setdefault(c[4], []).append(c)
        handled += rec["handled"]
    if not handled:
        raise RuntimeError(f"no handled events traced in {directory}")
    start = min(h[1] for h in handled) + 1_500_000_000
    for table in (routed, writes, chunks):
        for v in table.values():
            v.sort()
    read_start: dict[int, int] = {}  # id of a chunk record -> decode time of its read's first
    for v in chunks.values():
        for a, b in zip([None, *v], v, strict=False):
            if a is not None and a[1] == 256 and 0 <= b[2] - a[3] < 500_000:
                read_start[id(b)] = read_start[id(a)]
            else:
                read_start[id(b)] = b[0]
    route_firsts = {k: sorted((r[4], i) for i, r in enumerate(v)) for k, v in routed.items()}
    stages: dict[tuple[Any, Any], dict[str, list[float]]] = {}
    names = ("post -> routing starts", "routing itself", "routed -> written", "written -> read",
             "read -> its chunk decoded", "decoded -> handler", "handled (total)")
    for h in handled[::37]:
        ts, t_handled, me, wid = h
        if t_handled < start or wid not in routed:
            continue
        firsts = route_firsts[wid]
        i = bisect.bisect_right(firsts, (ts, 1 << 62)) - 1
        if i < 0:
            continue
        r = routed[wid][firsts[i][1]]
        if not r[4] <= ts <= r[5]:
            continue
        w = next((w for w in writes.get(me, []) if w[0] >= r[0] and w[3] <= ts <= w[4]), None)
        if w is None:
            w = next((w for w in writes.get(me, []) if w[0] >= r[1]), None)
        if w is None:
            continue
        c = next((c for c in chunks.get(me, []) if c[0] >= w[0] and c[2] <= ts <= c[3]), None)
        if c is None or c[0] > t_handled:
            continue
        row = stages.setdefault((wid, me), {n: [] for n in names})
        first = read_start[id(c)]
        for name, value in zip(names, (r[0] - ts, r[1] - r[0], w[0] - r[1], first - w[0], c[0] - first,
                                        t_handled - c[0], t_handled - ts), strict=True):
            row[name].append(value * 1e-6)
    out: dict[str, dict[str, float]] = {}
    for (wid, me), row in sorted(stages.items(), key=str):
        label = f"{'host' if wid == host else 'other'} {wid} -> {'host' if me == host else 'other'} {me}"
        out[label] = {n: _pct(v, 0.5) for n, v in row.items()}
        out[label]["events sampled"] = len(row[names[0]])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--routes", default="workerbus,workerbus-embedded")
    ap.add_argument(
        "--storm", default="1000/0.1", help="events per burst per worker / seconds between"
    )
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--out", help="keep the traces in this directory")
    ap.add_argument("--hops", action="store_true", help="also the per-hop table per worker pair")
    args = ap.parse_args()
    why = seed.unavailable()
    if why:
        sys.exit(f"storm_delays: {why}")
    burst, _, every = args.storm.partition("/")
    storm = seed.Storm("storm", int(burst), float(every))
    settings = seed.SeedSettings(storms=[storm], duration=args.duration)
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "WB_STORM_TRACE")}
    tables: dict[str, dict[str, Any]] = {}
    ap_out = args.out
    with tempfile.TemporaryDirectory(prefix="wbstorm-") as tmp:
        out = ap_out or tmp
        try:
            os.environ["PYTHONPATH"] = os.pathsep.join(
                p for p in (os.path.join(_HERE, "storm_trace"), saved["PYTHONPATH"]) if p
            )
            for route in args.routes.split(","):
                directory = os.path.join(out, route)
                os.makedirs(directory, exist_ok=True)
                os.environ["WB_STORM_TRACE"] = directory
                r = seed.run_once(settings, route, storm)
                if not r.get("ok"):
                    sys.exit(f"storm_delays: {route} failed: {r.get('error')}")
                print(
                    f"{route}: {r['requests_per_s']:,.0f} req/s, HTTP p99 {r.get('latency_p99_ms')} ms, "
                    f"background CPU {r['background_cpu_pct']} %"
                )
                tables[route] = analyse(directory)
                if args.hops:
                    for pair, row in hops(directory).items():
                        print(f"  {pair}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    routes = list(tables)
    print("\n| stage (ms) | " + " | ".join(routes) + " |")
    print("|---|" + "---:|" * len(routes))
    for stage in next(iter(tables.values())):
        print(f"| {stage} | " + " | ".join(f"{tables[r][stage]:.1f}" for r in routes) + " |")


if __name__ == "__main__":
    main()
