"""The failover benchmark against two trees, in alternating blocks of kills.

    python -m benchmarks.failover_ab --before f556639 --kills 100 --block 20

On a shared machine the background load swings more between two back-to-back 100-kill
runs than the code changes the result (docs/benchmarks.md, failover). So the kills are
split into blocks, run alternately against each tree (before, after, after, before, ...),
and the rounds of each tree are merged: both meet the same load. ``--before`` and
``--after`` are commits exported with ``git archive``, or ``WORKTREE`` for this
checkout's files as they are now (copied, so editing during the run changes nothing);
``--before-transport``/``--after-transport`` compare transports the same way:

    python -m benchmarks.failover_ab --before WORKTREE --before-transport http --after-transport stream

This checkout's benchmarks/failover.py runs in both trees.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from benchmarks.failover import print_result, summarize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def export(ref: str, tree: str) -> str:
    if os.path.isdir(ref):  # a tree prepared by hand (e.g. a variant of this checkout)
        shutil.copytree(ref, tree, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__"))
    elif ref == "WORKTREE":
        os.makedirs(tree)
        files = subprocess.run(
            ["git", "-C", ROOT, "ls-files", "-z"], check=True, capture_output=True
        ).stdout.split(b"\0")
        for name in filter(None, files):
            src = os.path.join(ROOT, name.decode())
            if os.path.isfile(src):
                dst = os.path.join(tree, name.decode())
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copy2(src, dst)
    else:
        os.makedirs(tree)
        archive = subprocess.run(["git", "-C", ROOT, "archive", ref], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
    shutil.copy2(os.path.join(ROOT, "benchmarks", "failover.py"), os.path.join(tree, "benchmarks", "failover.py"))
    return tree


def run_block(tree: str, transport: str, args: argparse.Namespace, kills: int, out: str) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "benchmarks.failover", "--workers", str(args.workers), "--kills", str(kills),
        "--transport", transport, "--interval", str(args.interval), "--json", out,
    ]
    subprocess.run(cmd, cwd=tree, check=True, stdout=subprocess.DEVNULL)
    with open(out) as f:
        result: dict[str, Any] = json.load(f)["results"][0]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.failover_ab", description=__doc__.split("\n")[0])
    p.add_argument("--before", required=True, help="a commit, WORKTREE, or a directory holding a tree")
    p.add_argument("--after", default="WORKTREE", help="a commit, WORKTREE (default), or a directory")
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--kills", type=int, default=100, help="kills per tree")
    p.add_argument("--block", type=int, default=20, help="kills per block")
    p.add_argument("--transport", choices=("http", "stream"), default="http", help="of both trees")
    p.add_argument("--before-transport", choices=("http", "stream"), default=None)
    p.add_argument("--after-transport", choices=("http", "stream"), default=None)
    p.add_argument("--interval", type=float, default=0.005)
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)
    if args.block < 1 or args.kills < args.block:
        p.error("need 1 <= --block <= --kills")
    scratch = tempfile.mkdtemp(prefix="wb-fo-ab-")
    try:
        trees = {name: export(getattr(args, name), os.path.join(scratch, name)) for name in ("before", "after")}
        transports = {name: getattr(args, f"{name}_transport") or args.transport for name in ("before", "after")}
        blocks: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
        order = ["before", "after"]
        done = 0
        while done < args.kills:
            kills = min(args.block, args.kills - done)
            for name in order:
                res = run_block(trees[name], transports[name], args, kills, os.path.join(scratch, "block.json"))
                blocks[name].append(res)
                print(
                    f"{name:>6} block {len(blocks[name])}: median {res['failover_median_ms']:.1f} ms, "
                    f"max {res['failover_max_ms']:.1f} ms, background {res['background_pct']:.0f} %",
                    flush=True,
                )
            order.reverse()  # ABBA: neither tree always runs first
            done += kills
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    merged = {}
    for name, runs in blocks.items():
        seconds = sum(r["seconds"] for r in runs)
        res = {
            "workers": args.workers,
            "transport": transports[name],
            "publish_interval_s": args.interval,
            "tree": getattr(args, name),
            "seconds": seconds,
            # time-weighted over the blocks
            "background_pct": sum(r["background_pct"] * r["seconds"] for r in runs) / seconds,
            "fleet_cpu_pct": sum(r["fleet_cpu_pct"] * r["seconds"] for r in runs) / seconds,
            "block_medians_ms": [r["failover_median_ms"] for r in runs],
            **summarize([x for r in runs for x in r["rounds"]]),
        }
        merged[name] = res
        print(f"\n{name}: {res['tree']}", end="")
        print_result(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python -m benchmarks.failover_ab " + " ".join(argv or sys.argv[1:]),
                       "cpus": os.cpu_count(), "results": merged}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
