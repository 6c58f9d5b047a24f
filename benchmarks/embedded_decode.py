"""Per-event CPU of the embedded client's receive decode against the plain client's, no sockets.

    python benchmarks/embedded_decode.py [--events 2000]

The same deliveries (a numbered broadcast from another worker, as an embedded publisher
sends them) through ``Client._decode_batch`` (one ``decode_event_batch`` loop) and
``Sequencer.decode_batch`` of an EmbeddedClient (one check per delivery, with the sequence
check). Process CPU per event, best of 20; the clients are built but never connected.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import msgpack

from shared.client import Client
from shared.embed import EmbeddedClient
from shared.transportnames import load_transport


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=2000)
    args = ap.parse_args()
    count: int = args.events
    numbered = [0]

    def deliveries() -> list[bytes]:
        # numbers go on from round to round, so the sequence check sees no gap
        base = numbered[0]
        numbered[0] += count
        return [
            msgpack.packb(
                {
                    "source": "storm",
                    "event": "tick",
                    "data": {"i": i, "ts": time.monotonic_ns()},
                    "wid": 3,
                    "sb": base + i + 1,
                }  # fmt: skip
            )
            for i in range(count)
        ]

    def best_ns(decode: Callable[[list[bytes]], object], rounds: int = 20) -> float:
        best = float("inf")
        for _ in range(rounds):
            payloads = deliveries()
            t = time.process_time()
            decode(payloads)
            best = min(best, time.process_time() - t)
        return best / count * 1e9

    address = "unix:/tmp/workerbus-embedded-decode-bench.sock"  # never connected
    plain = Client(address, transport=load_transport("http"), worker_id=1)
    embedded = EmbeddedClient(address, worker_id=1, workers=2)
    print(f"Client (ClientHooks)          {best_ns(lambda p: plain.hooks.decode_batch(plain, p)):6.0f} ns/event")
    print(f"EmbeddedClient (Sequencer)    {best_ns(lambda p: embedded.sequencer.decode_batch(embedded, p)):6.0f} ns/event")


if __name__ == "__main__":
    main()
