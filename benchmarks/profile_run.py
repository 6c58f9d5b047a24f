"""Profile the processes of one fan-out run with cProfile: broker, a subscriber, a publisher.

    python benchmarks/profile_run.py workerbus-stream-asyncio --subs 16 --pubs 4 --events 100000

Writes <out>/broker.prof (the broker command runs under ``python -m cProfile``),
<out>/sub0.prof and <out>/pub0.prof (the first subscriber and publisher profile their
event loop), then prints the top functions of each by own time. cProfile slows Python
code down unevenly, so use it for where the time goes, not for how much there is.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
from typing import Any

from shared.tools.bench import worker
from shared.tools.bench.fanout import run_one
from shared.tools.bench.peers import base, rawuds, workerbus


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario")
    ap.add_argument("--subs", type=int, default=4)
    ap.add_argument("--pubs", type=int, default=1)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--out", default="/tmp/wbprof")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    broker_prof = os.path.join(args.out, "broker.prof")

    real_spawn = base.spawn

    def spawn(argv: list[str], **kw: Any) -> Any:
        # `python -m X ...` → `python -m cProfile -o FILE -m X ...`
        if len(argv) > 2 and argv[1] == "-m":
            argv = [argv[0], "-m", "cProfile", "-o", broker_prof, *argv[1:]]
        return real_spawn(argv, **kw)

    setattr(workerbus, "spawn", spawn)  # noqa: B010 - patching the name the module looks up
    setattr(rawuds, "spawn", spawn)  # noqa: B010

    real_run_on = worker.run_on

    def run_on(backend: str, func: Any, *fargs: Any) -> None:
        # func is _subscriber_async / _publisher_async; the 3rd argument is the index.
        role = "sub" if "subscriber" in func.__name__ else "pub"
        if fargs[2] != 0:
            real_run_on(backend, func, *fargs)
            return
        prof = cProfile.Profile()
        prof.enable()
        try:
            real_run_on(backend, func, *fargs)
        finally:
            prof.disable()
            prof.dump_stats(os.path.join(args.out, f"{role}0.prof"))

    worker.run_on = run_on
    r = run_one(args.scenario, test="thr", n_subs=args.subs, n_pubs=args.pubs, events=args.events, timeout=300)
    print({k: r.get(k) for k in ("ok", "error", "deliveries_per_s", "broker_cpu_s_per_M", "total_cpu_s_per_M")})
    for name in ("broker", "sub0", "pub0"):
        path = os.path.join(args.out, f"{name}.prof")
        if os.path.exists(path):
            print(f"\n===== {name}")
            pstats.Stats(path, stream=sys.stdout).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
