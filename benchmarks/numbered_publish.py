"""Per-publish CPU of an embedded worker's numbered publishes, in one process, no sockets.

    python -m benchmarks.numbered_publish

``await publish(...)`` of the seed's event (``{"i": i, "ts": ns}`` to ``all``) into the
buffer of a client that is not connected (its buffer is large): a plain ``Client`` (its
``publish_encoder``), an ``EmbeddedClient`` with ``shared/numbered.py``'s short path, and
the same with the careful path it replaces (``Sequencer.encode_publish``, set on the
client's hooks). Process CPU per publish, best of 5, the three interleaved.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio

import streambus
from shared.client import Client
from shared.embed import EmbeddedClient
from shared.messages import ALL

COUNT = 100_000
ADDRESS = "unix:/nonexistent/bus.sock"


def plain() -> Client:
    return Client(ADDRESS, transport=streambus.TRANSPORT, worker_id=1, max_buffer_len=10**9)


def numbered() -> Client:
    return EmbeddedClient(ADDRESS, transport="stream", worker_id=1, workers=2, max_buffer_len=10**9)


def careful() -> Client:
    client = EmbeddedClient(ADDRESS, transport="stream", worker_id=1, workers=2, max_buffer_len=10**9)
    client.hooks.encode_publish = client.sequencer.encode_publish  # type: ignore[method-assign]
    client._encode_publish = client.hooks.encode_publish  # (private: bound once in __init__)
    client._new_encoder()
    return client


async def run(make: Callable[[], Client]) -> float:
    client = make()
    publish = client.publish
    now = time.monotonic_ns
    t0 = time.process_time()
    for i in range(COUNT):
        await publish("bench", "tick", {"i": i, "ts": now()}, ALL)
    return time.process_time() - t0


def main() -> None:
    best: dict[str, float] = {}
    for _ in range(5):
        for name, make in (("plain Client", plain), ("embedded, short", numbered), ("embedded, careful", careful)):
            best[name] = min(best.get(name, float("inf")), anyio.run(run, make))
    for name, seconds in best.items():
        print(f"{name:18s} {seconds / COUNT * 1e9:6.0f} ns/publish")


if __name__ == "__main__":
    main()
