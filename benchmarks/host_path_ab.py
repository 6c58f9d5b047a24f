"""A/B of the seed experiment's embedded route between two trees, alternated.

Each repetition runs, one window each: no events, the shared-memory poller, and the
embedded route with this tree's code and with the other tree's (``--before``, e.g. a
checkout of main), in an order that alternates between repetitions, so both see the same
minutes of this shared machine. The seed's server processes import ``shared`` from
``PYTHONPATH``, which is set per window. Prints one line per window (with the background
CPU the bench measured) and the medians, paired per repetition.

    .venv/bin/python -m benchmarks.host_path_ab --before /work/main --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

from shared.tools.bench.seed import SeedSettings, Storm, run_once

HERE = str(Path(__file__).resolve().parent.parent)


def _window(s: SeedSettings, mode: str, storm: Storm | None, tree: str) -> dict[str, Any]:
    os.environ["PYTHONPATH"] = tree
    return run_once(s, mode, storm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="the other tree (its directory holds shared/)")
    ap.add_argument("--also", action="append", default=[], metavar="NAME=TREE", help="a third tree (repeatable)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--burst", type=int, default=1000)
    ap.add_argument("--every", type=float, default=0.1)
    ap.add_argument("--transport", default="stream")
    ap.add_argument("--json", help="write every window here")
    ap.add_argument("--max-bg", type=float, default=100.0, help="re-run a window with more background CPU (%%)")
    ap.add_argument("--retries", type=int, default=3, help="re-runs per window at most (--max-bg)")
    args = ap.parse_args()
    storm = Storm("heavy", args.burst, args.every)
    s = SeedSettings(duration=args.duration, reps=args.reps, storms=[storm], transport=args.transport)
    # The servers are started from a directory without shared/ in it, so PYTHONPATH decides.
    scratch = "/tmp/hostpath-ab"
    os.makedirs(scratch, exist_ok=True)
    os.chdir(scratch)
    variants = [("after", HERE), ("before", args.before)]
    for also in args.also:
        name, _, tree = also.partition("=")
        variants.append((name, tree))
    labels = [label for label, _ in variants]
    rows: list[dict[str, Any]] = []
    for rep in range(args.reps):
        # the routes of this repetition, the embedded variants in an order that rotates
        turn = variants[rep % len(variants) :] + variants[: rep % len(variants)]
        plan = [("none", None, HERE, "none"), ("shm-poll", storm, HERE, "poller")]
        plan += [("workerbus-embedded", storm, tree, label) for label, tree in turn]
        for mode, st, tree, label in plan:
            for _ in range(1 + args.retries):
                r = _window(s, mode, st, tree)
                if not r.get("ok") or r["background_cpu_pct"] <= args.max_bg:
                    break
                print(f"rep {rep} {label:7s} background {r['background_cpu_pct']} %: again", flush=True)
            r.update(rep=rep, label=label)
            rows.append(r)
            if r.get("ok"):
                print(
                    f"rep {rep} {label:7s} {r['requests_per_s']:>9,.0f} req/s  p99 {r['latency_p99_ms']:6.2f} ms"
                    f"  delay p50 {r.get('event_delay_p50_ms', float('nan')):6.2f} p99"
                    f" {r.get('event_delay_p99_ms', float('nan')):7.2f} ms  events {r['received_per_s']:>8,.0f}/s"
                    f"  bg {r['background_cpu_pct']:4.1f}%",
                    flush=True,
                )
            else:
                print(f"rep {rep} {label:7s} FAILED: {r.get('error')}", flush=True)
    print("medians (ratios paired per repetition):")
    for label in labels:
        ratios: dict[str, list[float]] = {"rps/none": [], "rps/poller": [], "p99/poller": [], "delay50/poller": []}
        for rep in range(args.reps):
            got = {r["label"]: r for r in rows if r["rep"] == rep and r.get("ok")}
            mine, none, shm = got.get(label), got.get("none"), got.get("poller")
            if not mine:
                continue
            if none:
                ratios["rps/none"].append(mine["requests_per_s"] / none["requests_per_s"])
            if shm:
                ratios["rps/poller"].append(mine["requests_per_s"] / shm["requests_per_s"])
                ratios["p99/poller"].append(mine["latency_p99_ms"] / shm["latency_p99_ms"])
                if mine.get("event_delay_p50_ms") and shm.get("event_delay_p50_ms"):
                    ratios["delay50/poller"].append(mine["event_delay_p50_ms"] / shm["event_delay_p50_ms"])
        print(f"  {label:7s} " + "  ".join(
            f"{k} {statistics.median(v):.3f}" if v else f"{k} -" for k, v in ratios.items()))  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
