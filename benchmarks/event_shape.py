"""Per-event CPU of the inner event as a msgpack map (today) or as a 4-array, no sockets.

    python benchmarks/event_shape.py [--events 256] [--rounds 7]

A measurement for a possible negotiated extension, not a feature: a subscriber's per-event
work starts with the Unpacker building one dict with four string keys per event. This
prints, per event (median of ``--rounds``):

- encode: ``encode_event`` (the map the publisher builds) against ``packb`` of
  ``[source, event, data, wid]``;
- decode: an unframed read of ``--events`` events through the connection's Unpacker
  (``MsgpackStreamDecoder``) plus ``decode_event_objects`` (the real receive path) against
  the same Unpacker on arrays plus the equivalent checks on a list;
- the bytes per event of each shape.

The payload is the bench's (``{"i": sequence, "ts": time_ns}``). The figures are interpreter-bound:
compare shapes within one run, not across machines. In one process the array halves the
decode; in the fan-out a prototype gained only 1-11 % (docs/benchmarks.md, "The inner
event's shape: not the lever for N=16 P=4"): per-delivery costs outside the decode
dominate there.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import msgpack

from shared.codec import MsgpackStreamDecoder
from shared.messages import decode_event_objects, encode_event
from shared.profile import NATIVE


def decode_arrays(objects: list[object]) -> list[tuple[str, str, Any, int | None]]:
    """What ``decode_event_objects`` would do for ``[source, event, data, wid]``."""
    out: list[tuple[str, str, Any, int | None]] = []
    append = out.append
    for msg in objects:
        if type(msg) is list and len(msg) == 4:
            source, event, data, wid = msg
            if type(source) is str and type(event) is str and (wid is None or type(wid) is int):
                append((source, event, data, wid))
                continue
        raise ValueError("not an event")
    return out


def per_event_ns(work: Callable[[], object], events: int, rounds: int) -> float:
    repeat = max(1, 200_000 // events)
    samples = []
    for _ in range(rounds):
        start = time.process_time_ns()
        for _ in range(repeat):
            work()
        samples.append((time.process_time_ns() - start) / repeat / events)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=256, help="events per read (default 256)")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    n = args.events
    now = time.time_ns()
    maps = b"".join(encode_event(NATIVE, "bench", "tick", {"i": i, "ts": now}, 3) for i in range(n))
    arrays = b"".join(msgpack.packb(["bench", "tick", {"i": i, "ts": now}, 3]) for i in range(n))
    map_decoder, array_decoder = MsgpackStreamDecoder(65535), MsgpackStreamDecoder(65535)

    def decode_maps() -> object:
        events, errors = decode_event_objects(map_decoder.feed(maps))
        assert len(events) == n and not errors
        return events

    def decode_array_read() -> object:
        return decode_arrays(array_decoder.feed(arrays))

    def encode_maps() -> object:
        return [encode_event(NATIVE, "bench", "tick", {"i": i, "ts": now}, 3) for i in range(n)]

    packb = msgpack.packb

    def encode_arrays() -> object:
        return [packb(["bench", "tick", {"i": i, "ts": now}, 3]) for i in range(n)]

    rows = [
        ("bytes per event", len(maps) / n, len(arrays) / n),
        ("encode, ns per event", per_event_ns(encode_maps, n, args.rounds), per_event_ns(encode_arrays, n, args.rounds)),
        ("decode, ns per event", per_event_ns(decode_maps, n, args.rounds), per_event_ns(decode_array_read, n, args.rounds)),
    ]
    print(f"{n} events per read, median of {args.rounds} rounds (process CPU)")
    print(f"{'':24} {'map':>8} {'array':>8} {'array/map':>10}")
    for name, a, b in rows:
        print(f"{name:24} {a:8.1f} {b:8.1f} {b / a:10.2f}")


if __name__ == "__main__":
    main()
