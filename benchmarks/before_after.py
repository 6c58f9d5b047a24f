"""Measure workerbus at another commit (e.g. before the speed work) and now, interleaved.

    python benchmarks/before_after.py --commit 5205a50 --reps 3

Exports the commit's tree to a temp dir (``git archive``: the working tree is not touched),
copies this checkout's ``shared/tools/bench`` harness into it, and runs the same fan-out
configurations against both trees, alternating, so that background load hits both alike.
``--limit``: also ``limit-raw-uds`` (from this checkout) in every round, the yardstick of
issue #14. Prints every run as it ends, then the medians.
Only the asyncio and trio scenarios can run on trees whose ``workerbus broker`` has no
``--backend uvloop``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ONE_RUN = """
import json, sys
from shared.tools.bench.fanout import run_one
sc, n, p, e = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print(json.dumps(run_one(sc, test="thr", n_subs=n, n_pubs=p, events=e, timeout=120)))
"""

KEYS = ("deliveries_per_s", "total_cpu_s_per_M", "sub_cpu_s_per_M", "pub_cpu_s_per_M", "broker_cpu_s_per_M")


def export(commit: str) -> str:
    tree = tempfile.mkdtemp(prefix="wb-tree-")
    archive = subprocess.run(["git", "-C", ROOT, "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
    harness = os.path.join("shared", "tools", "bench")
    shutil.rmtree(os.path.join(tree, harness), ignore_errors=True)
    shutil.copytree(os.path.join(ROOT, harness), os.path.join(tree, harness))
    return tree


def run(tree: str, scenario: str, n: int, p: int, events: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=tree)
    out = subprocess.run([sys.executable, "-c", _ONE_RUN, scenario, str(n), str(p), str(events)],
                         cwd=tree, env=env, capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    if not result.get("ok"):
        raise RuntimeError(result.get("error"))
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--commit", default="5205a50")
    ap.add_argument("--scenario", default="workerbus-stream-asyncio")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--configs", default="4x1:100000,16x4:50000", help="NxP:events,...")
    ap.add_argument("--limit", action="store_true", help="also run limit-raw-uds in every round")
    args = ap.parse_args()
    before = export(args.commit)
    try:
        for cfg in args.configs.split(","):
            np_, events = cfg.split(":")
            n, p = (int(x) for x in np_.split("x"))
            rows: dict[str, list[dict[str, float]]] = {"before": [], "now": []}
            plan = [("before", before, args.scenario), ("now", ROOT, args.scenario)]
            if args.limit:
                rows["limit"] = []
                plan.append(("limit", ROOT, "limit-raw-uds"))
            for rep in range(args.reps):
                for label, tree, scenario in plan if rep % 2 == 0 else plan[::-1]:
                    result = run(tree, scenario, n, p, int(events))
                    rows[label].append(result)
                    print(f"  round {rep} {label:6s} " + "  ".join(
                        f"{k.replace('_s_per_M', '/M')} {result[k]:,.3f}" for k in KEYS if "cpu" in k
                    ) + f"  bg {result.get('background_cpu_pct', 0):.0f}%", flush=True)  # fmt: skip
            for label, rs in rows.items():
                med = {k: statistics.median(r[k] for r in rs) for k in KEYS}
                bg = statistics.median(r.get("background_cpu_pct", 0) for r in rs)
                print(f"{args.scenario} N={n} P={p} {label:6s} " + "  ".join(
                    f"{k.replace('_s_per_M', '/M')} {v:,.3f}" if "cpu" in k else f"{k} {v:,.0f}"
                    for k, v in med.items()) + f"  bg {bg:.0f}%")  # fmt: skip
    finally:
        shutil.rmtree(before, ignore_errors=True)


if __name__ == "__main__":
    main()
