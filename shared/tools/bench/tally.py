"""Per-subscriber bookkeeping: what every peer's subscriber does with each event it gets.

Three kinds of event cross the bus during a run: ``sync`` (the start-up probe, marks this
subscriber as reached by one publisher), ``tick`` (the measured events, carrying the
CLOCK_MONOTONIC time at which they were published) and ``end`` (one per publisher after its
last tick). All peers run exactly this code per event, so the per-event Python work on the
receiving side is the same for everyone; only the transport and its client differ.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable, MutableSequence
from typing import Any

__all__ = ["Tally"]

_now = time.monotonic_ns


class Tally:
    """Counts ticks, records latencies, notices sync probes and end markers.

    Args:
        index: this subscriber's number (0..N-1).
        n_pubs: publishers in the run; the subscriber is done after that many end markers.
        seen: shared flags, one per (subscriber, publisher) pair, set on a sync probe.
        want_latency: keep publish→receive latency of every tick.
    """

    __slots__ = ("count", "done", "ends", "index", "last_ns", "latencies", "n_pubs", "on_done", "seen")

    def __init__(
        self, index: int, n_pubs: int, seen: MutableSequence[int], *, want_latency: bool
    ) -> None:
        self.index = index
        self.n_pubs = n_pubs
        self.seen = seen
        self.latencies: array[int] | None = array("q") if want_latency else None
        self.count = 0
        self.ends = 0
        self.last_ns = 0
        self.done = False
        #: Called once when the last end marker arrives (callback-style subscribers).
        self.on_done: Callable[[], object] | None = None

    def _other(self, event: str, data: Any) -> None:
        if event == "sync":
            self.seen[self.index * self.n_pubs + data["p"]] = 1
        elif event == "end":
            self.ends += 1
            if self.ends >= self.n_pubs:
                self.done = True
                if self.on_done is not None:
                    self.on_done()

    def take(self, batch: list[tuple[str, str, Any]]) -> None:
        """A batch that a pull-style client returned; one clock read for the whole batch,
        taken after the client decoded it (the time the application gets to see it)."""
        now = _now()
        lat = self.latencies
        before = self.count
        for _source, event, data in batch:
            if event == "tick":
                self.count += 1
                if lat is not None:
                    lat.append(now - data["ts"])
            else:
                self._other(event, data)
        if self.count != before:
            self.last_ns = now

    def handler(self, data: Any, event: str, source: str, wid: int | None) -> None:
        """A workerbus handler: called by the client's dispatcher, one event at a time."""
        if event == "tick":
            now = _now()
            self.count += 1
            self.last_ns = now
            if self.latencies is not None:
                self.latencies.append(now - data["ts"])
        else:
            self._other(event, data)
