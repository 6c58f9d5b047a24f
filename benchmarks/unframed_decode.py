"""Per-event CPU of decoding deliveries with and without length headers, no sockets.

    python benchmarks/unframed_decode.py [--events 2000]

Today a client splits each read into frames (``FrameDecoder``) and decodes them one by one
(``decode_event_batch``). msgpack objects delimit themselves, so deliveries written back
to back without headers could be read by one ``msgpack.Unpacker`` iterating in C. This
measures both on the same native events (process CPU per event, best of 30), with the
same validity checks, and the Unpacker alone. A measurement for a possible negotiated
extension (issue #14), not a feature.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import msgpack

from shared.frame import FrameDecoder
from shared.messages import decode_event_batch, encode_event
from shared.profile import NATIVE


def best_ns(func: Callable[[], object], count: int, rounds: int = 30) -> float:
    best = float("inf")
    for _ in range(rounds):
        t = time.process_time()
        func()
        best = min(best, time.process_time() - t)
    return best / count * 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=2000)
    args = ap.parse_args()
    events = [
        encode_event(NATIVE, "bench", "tick", {"i": i, "ts": time.monotonic_ns()}, 7)
        for i in range(args.events)
    ]
    framed = b"".join(len(e).to_bytes(NATIVE.header_len, "big") + e for e in events)
    bare = b"".join(events)

    def framed_path() -> None:
        payloads = FrameDecoder(NATIVE.header_len).feed(framed)
        out, errors = decode_event_batch(NATIVE, payloads)
        assert len(out) == args.events and not errors

    def unpacker_path() -> None:
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(bare)
        out: list[tuple[str, str, Any, int | None]] = []
        append = out.append
        for msg in unpacker:
            if type(msg) is dict:
                source, event, wid = msg["source"], msg["event"], msg.get("wid")
                if type(source) is str and type(event) is str and (wid is None or type(wid) is int):
                    append((source, event, msg.get("data"), wid))
        assert len(out) == args.events

    def unpacker_only() -> None:
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(bare)
        assert len(list(unpacker)) == args.events

    print(
        f"framed: FrameDecoder + decode_event_batch  {best_ns(framed_path, args.events):6.0f} ns/event"
    )
    print(
        f"bare: one Unpacker + the same checks        {best_ns(unpacker_path, args.events):6.0f} ns/event"
    )
    print(
        f"bare: one Unpacker alone                    {best_ns(unpacker_only, args.events):6.0f} ns/event"
    )


if __name__ == "__main__":
    main()
