"""Summarise a py-spy ``--format raw`` profile: where each process role spends its time.

    py-spy record --subprocesses --format raw -r 500 -o prof.txt -- workerbus bench ...
    python benchmarks/pyspy_summary.py prof.txt [--top 25]

Processes are grouped by role (broker, publisher, subscriber, other), recognised from the
functions on their stacks; for each role it prints the functions with the most samples on
top of the stack (self time) and on the stack at all (inclusive time).
"""

from __future__ import annotations

import argparse
import collections
import re

# py-spy nests a child under its parent: `process A:"cmd";process B:"cmd";frames... N`.
_LINE = re.compile(r"^(?:process \d+:\"[^\"]*\";)*process (\d+):\"([^\"]*)\";(.*) (\d+)$")


def role_of(stacks: list[str], cmd: str) -> str:
    text = ";".join(stacks)
    if "_publisher_async" in text or "_publisher_sync" in text:
        return "publisher"
    # (a subscriber's client tasks do not have the harness's coroutine on their stacks)
    if "_subscriber" in text or "Dispatcher.run" in text or "Subscription.run" in text:
        return "subscriber"
    if " broker" in cmd or "_broker" in cmd or "serve" in text:
        return "broker"
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    per_pid: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    cmds: dict[str, str] = {}
    with open(args.path) as f:
        for line in f:
            m = _LINE.match(line.rstrip("\n"))
            if not m:
                continue
            pid, cmd, stack, n = m.group(1), m.group(2), m.group(3), int(m.group(4))
            per_pid[pid].append((stack, n))
            cmds[pid] = cmd
    roles: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    pids: dict[str, int] = collections.Counter()
    for pid, rows in per_pid.items():
        role = role_of([s for s, _ in rows], cmds[pid])
        roles[role].extend(rows)
        pids[role] += 1
    for role, rows in sorted(roles.items()):
        total = sum(n for _, n in rows)
        self_t: collections.Counter[str] = collections.Counter()
        incl: collections.Counter[str] = collections.Counter()
        for stack, n in rows:
            frames = [re.sub(r" \(.*?:\d+\)$", lambda mm: " (" + mm.group(0).split("(")[1].split(":")[0].rsplit("/", 1)[-1] + ")", fr) for fr in stack.split(";")]
            self_t[frames[-1]] += n
            for fr in set(frames):
                incl[fr] += n
        print(f"== {role}: {pids[role]} process(es), {total} samples")
        print("   self%  function")
        for fn, n in self_t.most_common(args.top):
            print(f"  {100 * n / total:5.1f}  {fn}")
        print("   incl%  function")
        for fn, n in incl.most_common(args.top):
            print(f"  {100 * n / total:5.1f}  {fn}")
        print()


if __name__ == "__main__":
    main()
