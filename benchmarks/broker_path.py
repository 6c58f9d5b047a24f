"""Per-publish CPU of the broker's Python work, in one process, no sockets.

    python benchmarks/broker_path.py [--subs 4] [--keyed 8]

One read's worth (~256 KiB) of native publish frames goes through what the broker does per
read: FrameDecoder → decode_publish_batch → Router.route_runs → per connection
take_batch + join (``--unframed``: the join of a connection granted ``unframed``, which
cuts each frame's header off). ``--keyed N``: keyed publishes (a client granted ``filter``) cycling
through N sources, each subscriber filtered to one of them (issue #14's subset shape). Compared with the limit-raw-uds broker's work on the same bytes (scan
the lengths, forward the run). Process CPU per publish, best of 5.
"""

from __future__ import annotations

import argparse
import operator
import time

from shared.frame import FrameDecoder
from shared.messages import OTHERS, build_publish_frame
from shared.profile import NATIVE
from shared.router import DEFAULT_MAX_BATCH_BYTES, Router
from shared.tools.bench.peers.rawuds_broker import complete_end

#: What the broker's writers take per send (Broker(max_batch_bytes=)).
BATCH = DEFAULT_MAX_BATCH_BYTES


def chunk(count: int, sources: int = 0) -> bytes:
    return b"".join(
        build_publish_frame(
            NATIVE, 99, f"s{i % sources}" if sources else "bench", "tick", {"i": i, "ts": time.monotonic_ns()},
            OTHERS, 65535, keyed=bool(sources),
        )
        for i in range(count)
    )


def workerbus(data: bytes, subs: int, rounds: int, sources: int = 0, unframed: bool = False) -> float:
    from shared.messages import RunKeys, decode_publish_batch

    router = Router(max_queue_len=10**9)
    queues = [router.attach(w) for w in range(subs)]
    if sources:
        for w, q in enumerate(queues):
            router.set_filter(q, frozenset({(f"s{w % sources}", "*")}))
    keys: list[RunKeys | None] | None = [] if sources else None
    dec = FrameDecoder(2)
    unframe = operator.itemgetter(slice(2, None))  # (what Broker._write does for "unframed")
    t0 = time.process_time()
    for _ in range(rounds):
        if keys is not None:
            keys.clear()
        runs, _err = decode_publish_batch(NATIVE, dec.feed(data), keys)
        router.route_runs(99, runs, keys)
        for q in queues:
            while q.frames:
                batch = q.take_batch(BATCH)
                b"".join(map(unframe, batch)) if unframed else b"".join(batch)
                q.mark_sent(len(batch))
    return time.process_time() - t0


def raw(data: bytes, subs: int, rounds: int) -> float:
    t0 = time.process_time()
    for _ in range(rounds):
        chunk = data[: complete_end(data)]  # the limit-raw-uds broker's own scan
        for _s in range(subs):
            bytes(chunk)  # what a write copies
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subs", type=int, default=4)
    ap.add_argument("--keyed", type=int, default=0, metavar="SOURCES")
    ap.add_argument("--unframed", action="store_true", help="every subscriber granted 'unframed'")
    args = ap.parse_args()
    per = 3800
    data = chunk(per, args.keyed)
    rounds = 50
    shape = f"{args.subs} subscribers" + (f", keyed, {args.keyed} sources" if args.keyed else "")
    shape += ", unframed" if args.unframed else ""
    best = min(workerbus(data, args.subs, rounds, args.keyed, args.unframed) for _ in range(5))
    print(f"{'workerbus broker':18s} {best / (rounds * per) * 1e9:7.0f} ns/publish ({shape})")
    best = min(raw(data, args.subs, rounds) for _ in range(5))
    print(f"{'raw broker':18s} {best / (rounds * per) * 1e9:7.0f} ns/publish ({shape}, every frame to every one)")


if __name__ == "__main__":
    main()
