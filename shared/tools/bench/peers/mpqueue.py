"""``mp-queue``: the standard library only. Publishers put msgpack bytes on one shared
``multiprocessing.Queue``; a broker process copies every message (undecoded) to one Queue
per subscriber. Everything is per event, as ``multiprocessing`` invites; subscribers drain
what is queued with ``get_nowait`` after each blocking ``get``.

The queues are created in the harness process and inherited by the forked workers and
broker, which is how ``multiprocessing`` shares them.
"""

from __future__ import annotations

import multiprocessing
import queue
import signal
from typing import Any

import msgpack

from shared.tools.bench.tally import Tally

from .base import BrokerHandle, Peer, RunSetup, SyncPublisher, SyncSubscription

__all__ = ["MpQueuePeer"]

_DRAIN = 1024


def _broker(inbound: Any, outbound: list[Any]) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    puts = [q.put for q in outbound]
    get = inbound.get
    while True:
        message = get()
        for put in puts:
            put(message)


class _QueuePublisher:
    def __init__(self, q: Any) -> None:
        self._q = q
        pack = msgpack.Packer().pack
        put = q.put

        def publish(source: str, event: str, data: Any) -> None:
            put(pack({"source": source, "event": event, "data": data}))

        self.publish = publish

    def flush(self) -> None:
        return None  # the queue's feeder thread writes in the background

    def close(self) -> None:
        self._q.close()
        self._q.join_thread()


class _QueueSubscription:
    def __init__(self, q: Any, tally: Tally) -> None:
        self._q = q
        self._tally = tally

    def run(self) -> None:
        unpack = msgpack.unpackb
        get, get_now = self._q.get, self._q.get_nowait
        tally = self._tally
        while not tally.done:
            msg = unpack(get())
            batch = [(msg["source"], msg["event"], msg["data"])]
            try:
                for _ in range(_DRAIN):
                    msg = unpack(get_now())
                    batch.append((msg["source"], msg["event"], msg["data"]))
            except queue.Empty:
                pass
            tally.take(batch)

    def close(self) -> None:
        return None


class MpQueuePeer(Peer):
    """multiprocessing.Queue in, a copying broker process, one Queue per subscriber."""

    is_sync = True
    events_scale = 0.125

    def describe(self) -> str:
        return "stdlib `multiprocessing.Queue` in, a broker process copying to one Queue per subscriber"

    def start(self, setup: RunSetup) -> BrokerHandle:
        ctx = multiprocessing.get_context("fork")
        inbound = ctx.Queue()
        outbound = [ctx.Queue() for _ in range(setup.n_subs)]
        setup.state["in"] = inbound
        setup.state["out"] = outbound
        proc = ctx.Process(target=_broker, args=(inbound, outbound), daemon=True)
        proc.start()

        def stop() -> None:
            proc.terminate()
            proc.join(3)
            if proc.is_alive():
                proc.kill()
                proc.join(3)
            for q in [inbound, *outbound]:
                q.close()
                q.cancel_join_thread()

        assert proc.pid is not None
        return BrokerHandle([proc.pid], stop)

    def publisher_sync(self, setup: RunSetup, index: int) -> SyncPublisher:
        return _QueuePublisher(setup.state["in"])

    def subscriber_sync(self, setup: RunSetup, index: int, tally: Tally) -> SyncSubscription:
        return _QueueSubscription(setup.state["out"][index], tally)
