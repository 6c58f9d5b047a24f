"""Per-event CPU of the receiving side, in one process, no sockets: workerbus vs the minimum.

    python benchmarks/client_path.py [--events 200000]

Builds one 256 KiB read's worth of delivery frames and pushes it through (a) what a
workerbus Client does per read (FrameDecoder → decode_event_fields → Dispatcher.push_many →
Dispatcher.run → a handler), (b) the same with the deliveries unframed (the ``unframed``
capability: MsgpackStreamDecoder → decode_event_objects → the same dispatch) and (c) what
the limit-raw-uds subscriber does (scan lengths, msgpack.unpackb, a tuple, the same
bookkeeping). Reports process CPU per event, so other
load on the machine matters less than for wall-clock figures.
"""

from __future__ import annotations

import argparse
import time

import anyio
import anyio.lowlevel
import msgpack

from shared.codec import MsgpackStreamDecoder
from shared.dispatch import Dispatcher
from shared.frame import FrameDecoder
from shared.messages import decode_event_fields, decode_event_objects, encode_event
from shared.profile import NATIVE
from shared.stream import OBJECT_PIECE
from shared.tools.bench.peers.rawuds import take_events
from shared.tools.bench.tally import Tally


def frames_chunk(count: int, with_wid: bool) -> bytes:
    out = bytearray()
    for i in range(count):
        if with_wid:
            inner = encode_event(NATIVE, "bench", "tick", {"i": i, "ts": time.monotonic_ns()}, 7)
        else:
            inner = msgpack.packb({"source": "bench", "event": "tick", "data": {"i": i, "ts": time.monotonic_ns()}})
        out += len(inner).to_bytes(2, "big") + inner
    return bytes(out)


def bench_workerbus(chunk: bytes, rounds: int) -> tuple[float, int]:
    tally = Tally(0, 1, bytearray(1), want_latency=False)
    disp = Dispatcher(1 << 30)
    disp.subscribe("*", "*", tally.handler)
    dec = FrameDecoder(2)

    async def main() -> float:
        async with anyio.create_task_group() as tg:
            tg.start_soon(disp.run)
            await anyio.lowlevel.checkpoint()
            t0 = time.process_time()
            for _ in range(rounds):
                batch = []
                for payload in dec.feed(chunk):
                    f = decode_event_fields(NATIVE, payload)
                    if f[0] == "workerbus" and f[1] == "dropped":
                        pass
                    batch.append(f)
                disp.push_many(batch)
                await anyio.lowlevel.checkpoint()
                while disp.depth:
                    await anyio.lowlevel.checkpoint()
            t1 = time.process_time()
            tg.cancel_scope.cancel()
        return t1 - t0

    return anyio.run(main), tally.count


def bench_unframed(chunk: bytes, rounds: int) -> tuple[float, int]:
    tally = Tally(0, 1, bytearray(1), want_latency=False)
    disp = Dispatcher(1 << 30)
    disp.subscribe("*", "*", tally.handler)
    # The same events without their headers: what the broker writes to a granted client.
    bare = b"".join(FrameDecoder(2).feed(chunk))
    dec = MsgpackStreamDecoder(NATIVE.max_frame_len)

    async def main() -> float:
        async with anyio.create_task_group() as tg:
            tg.start_soon(disp.run)
            await anyio.lowlevel.checkpoint()
            t0 = time.process_time()
            for _ in range(rounds):
                # (a piece at a time, as an ObjectStream decodes a read)
                for start in range(0, len(bare), OBJECT_PIECE):
                    batch, _ = decode_event_objects(dec.feed(bare[start : start + OBJECT_PIECE]))
                    disp.push_many(batch)
                    await anyio.lowlevel.checkpoint()
                while disp.depth:
                    await anyio.lowlevel.checkpoint()
            t1 = time.process_time()
            tg.cancel_scope.cancel()
        return t1 - t0

    return anyio.run(main), tally.count


def bench_raw(chunk: bytes, rounds: int) -> tuple[float, int]:
    tally = Tally(0, 1, bytearray(1), want_latency=False)
    unpack = msgpack.unpackb
    t0 = time.process_time()
    for _ in range(rounds):
        tally.take(take_events(bytearray(chunk), unpack))  # the limit-raw-uds subscriber's own work
    return time.process_time() - t0, tally.count


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=200_000)
    args = ap.parse_args()
    per = 4000
    rounds = max(1, args.events // per)
    for name, fn, wid in (
        ("workerbus client", bench_workerbus, True),
        ("unframed client", bench_unframed, True),
        ("raw subscriber", bench_raw, False),
    ):
        best = min(fn(frames_chunk(per, wid), rounds)[0] for _ in range(3))
        print(f"{name:18s} {best / (rounds * per) * 1e9:7.0f} ns/event")


if __name__ == "__main__":
    main()
