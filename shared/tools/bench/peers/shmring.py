"""``shm-poll``: the lua-resty-worker-events design in Python. There is no broker: a
publisher appends each event to a ring in ``multiprocessing.shared_memory`` under a lock,
and every subscriber wakes on a fixed timer, takes the lock to read the write index, and
decodes everything appended since its last poll. The latency is the poll interval by
construction (10 ms here; lua-resty-worker-events defaults to 1 s).

Ring: a 16-byte header (little-endian uint64 write index) and CAP slots of SLOT bytes, each
a 2-byte length and a payload. A poller more than CAP events behind loses the overwritten
ones; the harness counts them as lost.
"""

from __future__ import annotations

import multiprocessing
import struct
import time
from collections.abc import Callable
from multiprocessing import shared_memory
from typing import Any

import msgpack

from shared.tools.bench.tally import Tally

from .base import BrokerHandle, Peer, RunSetup, SyncPublisher, SyncSubscription

__all__ = ["HEADER", "SLOT", "ShmRingPeer", "ring_size"]

HEADER = 16
SLOT = 128
CAPACITY = 1 << 18  # 32 MiB of slots
_INDEX = struct.Struct("<Q")
_LEN = struct.Struct(">H")


def ring_size(capacity: int = CAPACITY) -> int:
    return HEADER + capacity * SLOT


def ring_append(buf: Any, payload: bytes, capacity: int = CAPACITY) -> None:
    """Append one payload; the caller holds the lock."""
    n = len(payload)
    if n > SLOT - 2:
        raise ValueError(f"event of {n} bytes does not fit a {SLOT}-byte ring slot")
    index = _INDEX.unpack_from(buf, 0)[0]
    off = HEADER + (index % capacity) * SLOT
    _LEN.pack_into(buf, off, n)
    buf[off + 2 : off + 2 + n] = payload
    _INDEX.pack_into(buf, 0, index + 1)


def ring_index(buf: Any) -> int:
    return int(_INDEX.unpack_from(buf, 0)[0])


def ring_read(buf: Any, start: int, stop: int, capacity: int = CAPACITY) -> list[bytes]:
    """Payloads ``start..stop-1`` (the caller checked they were not overwritten)."""
    out = []
    for k in range(start, stop):
        off = HEADER + (k % capacity) * SLOT
        n = _LEN.unpack_from(buf, off)[0]
        out.append(bytes(buf[off + 2 : off + 2 + n]))
    return out


def _attach(name: str) -> shared_memory.SharedMemory:
    # The harness owns and unlinks the segment; forked workers share its resource tracker,
    # so attaching here does not register a second owner.
    return shared_memory.SharedMemory(name=name)


class _RingPublisher:
    def __init__(self, name: str, lock: Any) -> None:
        self._shm = _attach(name)
        buf = self._shm.buf
        pack = msgpack.Packer().pack

        def publish(source: str, event: str, data: Any) -> None:
            payload = pack({"source": source, "event": event, "data": data})
            with lock:
                ring_append(buf, payload)

        self.publish: Callable[[str, str, Any], None] = publish

    def flush(self) -> None:
        return None

    def close(self) -> None:
        del self.publish  # the closure holds a view of the buffer, which must go first
        self._shm.close()


class _RingSubscription:
    def __init__(self, name: str, lock: Any, interval: float, tally: Tally) -> None:
        self._shm = _attach(name)
        self._lock = lock
        self._interval = interval
        self._tally = tally
        self.lost = 0
        with lock:
            self._last = ring_index(self._shm.buf)

    def run(self) -> None:
        buf = self._shm.buf
        tally = self._tally
        unpack = msgpack.unpackb
        interval = self._interval
        next_poll = time.monotonic() + interval
        while not tally.done:
            delay = next_poll - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            next_poll += interval
            if next_poll < time.monotonic():  # fell behind: do not poll back to back
                next_poll = time.monotonic() + interval
            with self._lock:
                index = ring_index(buf)
            start = self._last
            if index - start > CAPACITY:
                self.lost += index - CAPACITY - start
                start = index - CAPACITY
            batch = []
            for payload in ring_read(buf, start, index):
                msg = unpack(payload)
                batch.append((msg["source"], msg["event"], msg["data"]))
            self._last = index
            if batch:
                tally.take(batch)
        del buf

    def close(self) -> None:
        self._shm.close()


class ShmRingPeer(Peer):
    """Shared-memory ring under a lock, polled by every subscriber (no broker)."""

    is_sync = True
    has_broker = False

    def __init__(self, interval: float) -> None:
        self.interval = interval

    def describe(self) -> str:
        return (
            f"shared-memory ring + `multiprocessing.Lock`, every subscriber polls every "
            f"{self.interval * 1000:g} ms (lua-resty-worker-events design; no broker process)"
        )

    def start(self, setup: RunSetup) -> BrokerHandle:
        shm = shared_memory.SharedMemory(create=True, size=ring_size())
        assert shm.buf is not None
        shm.buf[:HEADER] = bytes(HEADER)
        setup.state["shm"] = shm.name
        setup.state["lock"] = multiprocessing.get_context("fork").Lock()

        def stop() -> None:
            shm.close()
            shm.unlink()

        return BrokerHandle([], stop)

    def publisher_sync(self, setup: RunSetup, index: int) -> SyncPublisher:
        return _RingPublisher(setup.state["shm"], setup.state["lock"])

    def subscriber_sync(self, setup: RunSetup, index: int, tally: Tally) -> SyncSubscription:
        return _RingSubscription(setup.state["shm"], setup.state["lock"], self.interval, tally)
