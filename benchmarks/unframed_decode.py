"""Per-event CPU of decoding deliveries with and without length headers, no sockets.

    python benchmarks/unframed_decode.py [--events 30000] [--rounds 15]

A framed client splits each read into frames (``FrameDecoder``) and decodes them one by one
(``decode_event_batch``); a client granted ``unframed`` (docs/protocol.md §8) feeds each
read to its connection's Unpacker (``MsgpackStreamDecoder``) and checks the maps
(``decode_event_objects``). Both on the same native events, in reads of 30, 300 and 3 000
events (process CPU per event, best of ``--rounds``), plus the Unpacker alone. A read's
decoded maps are alive together: the per-event cost grows with the read, which is why an
``ObjectStream`` reads 16 KiB (a few hundred events) at a time.
"""

from __future__ import annotations

import argparse
import time

from shared.codec import MsgpackStreamDecoder
from shared.frame import FrameDecoder
from shared.messages import decode_event_batch, decode_event_objects, encode_event
from shared.profile import NATIVE


def framed_path(reads: list[bytes]) -> float:
    decoder = FrameDecoder(NATIVE.header_len)
    t = time.process_time()
    for read in reads:
        decode_event_batch(NATIVE, decoder.feed(read))
    return time.process_time() - t


def unframed_path(reads: list[bytes]) -> float:
    decoder = MsgpackStreamDecoder(NATIVE.max_frame_len)
    t = time.process_time()
    for read in reads:
        decode_event_objects(decoder.feed(read))
    return time.process_time() - t


def unpacker_only(reads: list[bytes]) -> float:
    decoder = MsgpackStreamDecoder(NATIVE.max_frame_len)
    t = time.process_time()
    for read in reads:
        decoder.feed(read)
    return time.process_time() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=30_000)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    n = args.events
    events = [encode_event(NATIVE, "bench", "tick", {"i": i, "ts": time.monotonic_ns()}, 7) for i in range(n)]
    for per_read in (30, 300, 3000):
        framed = [b"".join(len(e).to_bytes(2, "big") + e for e in events[i : i + per_read]) for i in range(0, n, per_read)]
        bare = [b"".join(events[i : i + per_read]) for i in range(0, n, per_read)]
        runs: dict[str, list[float]] = {"framed": [], "unframed": [], "unpacker": []}
        for _ in range(args.rounds):  # interleaved, so that background load hits all alike
            runs["framed"].append(framed_path(framed))
            runs["unframed"].append(unframed_path(bare))
            runs["unpacker"].append(unpacker_only(bare))
        ns = {k: min(v) / n * 1e9 for k, v in runs.items()}
        print(
            f"{per_read:5d} events/read: framed (FrameDecoder + decode_event_batch) {ns['framed']:5.0f} "
            f"ns/event, unframed (MsgpackStreamDecoder + decode_event_objects) {ns['unframed']:5.0f}, "
            f"its Unpacker alone {ns['unpacker']:5.0f}"
        )


if __name__ == "__main__":
    main()
