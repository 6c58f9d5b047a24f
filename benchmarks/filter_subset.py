"""Whole-system CPU when each worker handles a subset of the events (issue #14, ``filter``).

    python benchmarks/filter_subset.py [--events 40000] [--subs 16] [--pubs 4] [--sources 8]

Real processes on a stream broker: ``--subs`` subscribers, each with one handler on
``(s<i % sources>, "*")``; ``--pubs`` publishers flood ``--events`` events to ``all``,
cycling through the sources; plus one publish-only client (no handlers) and one subscribed
to every event ("*", "*"). Run twice: with the filter (the default client) and without
(``Client(filtered=False)``). Reported: CPU of every process (broker, subscribers,
publishers, the two extra clients) per million handled events, and the publish-only and
the everything client's own CPU. Numbers from a shared machine: compare runs, not
absolutes.
"""

from __future__ import annotations

import argparse
import sys

from shared.tools.bench.subset import run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=96_000)
    ap.add_argument("--subs", type=int, default=16)
    ap.add_argument("--pubs", type=int, default=4)
    ap.add_argument("--sources", type=int, default=8)
    args = ap.parse_args()
    if args.events % (args.pubs * args.sources):
        print(f"filter_subset: --events must be a multiple of pubs * sources = {args.pubs * args.sources}",
              file=sys.stderr)
        return 2
    for filtered in (True, False):
        print(run(filtered, args.events, args.subs, args.pubs, args.sources), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
