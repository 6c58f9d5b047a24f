"""Per-publish CPU of the publishing side, in one process, no sockets.

    python benchmarks/publish_path.py

``await Client.publish(...)`` (buffer only: the client is not connected, its buffer is
large), plain and keyed (a client granted ``filter``), against the limit-raw-uds publisher's ``publish`` (pack, frame, append), both awaited
in the same loop as in the benchmark. Process CPU per publish, best of 5.
"""

from __future__ import annotations

import time

import anyio

import streambus
from shared.client import Client
from shared.messages import OTHERS

COUNT = 100_000


async def bus_publish(keyed: bool = False) -> float:
    client = Client("unix:/nonexistent.sock", transport=streambus.TRANSPORT, worker_id=1, max_buffer_len=10**9)
    if keyed:
        # As after a welcome that granted 'filter' (the benchmark's clients are): publishes
        # carry src/ev. (Private: no broker here to grant it.)
        client._filtering = True
        client._new_encoder()
    publish = client.publish
    now = time.monotonic_ns
    t0 = time.process_time()
    for i in range(COUNT):
        await publish("bench", "tick", {"i": i, "ts": now()}, OTHERS)
    return time.process_time() - t0


async def raw_publish() -> float:
    import msgpack

    buf = bytearray()
    pack = msgpack.Packer().pack

    async def publish(source: str, event: str, data: object) -> None:
        nonlocal buf
        payload = pack({"source": source, "event": event, "data": data})
        buf += len(payload).to_bytes(2, "big")
        buf += payload
        if len(buf) >= 65536:
            buf = bytearray()

    now = time.monotonic_ns
    t0 = time.process_time()
    for i in range(COUNT):
        await publish("bench", "tick", {"i": i, "ts": now()})
    return time.process_time() - t0


def main() -> None:
    runs = (
        ("Client.publish", bus_publish, False),
        ("  keyed (filter)", bus_publish, True),
        ("raw publisher", raw_publish, None),
    )
    for name, fn, keyed in runs:
        best = min(anyio.run(fn, *(() if keyed is None else (keyed,))) for _ in range(5))
        print(f"{name:16s} {best / COUNT * 1e9:6.0f} ns/publish")


if __name__ == "__main__":
    main()
