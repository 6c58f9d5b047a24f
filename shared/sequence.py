"""Per-publisher sequence numbers: how an embedded worker finds out it lost events.

When the process hosting the broker dies, whatever sat in that broker's memory is gone:
frames queued for a worker, and frames a publisher had written that the broker never read.
Nobody is left who knows what was lost, so the receivers work it out themselves:

- every embedded publisher numbers its events in the event map, one counter for
  broadcasts (``"sb"``: targets ``all`` and ``others`` share it) and one per target worker
  (``"sw"``). Unique events are not numbered: nobody knows which worker should get one;
- a receiver remembers the last number it saw from each publisher; a jump is a gap;
- after every (re)connect a publisher sends a ``sync`` marker with its latest numbers to
  ``others``, so a gap at the *end* of a stream (the last events before the broker died)
  is found too, not only when that publisher happens to publish again.

A gap is reported as a ``lost`` event unless a ``dropped`` notice from the broker (a full
queue) already accounted for it. Receivers never check their own streams.

Everything here is pure bookkeeping, driven by :class:`shared.embed.EmbeddedClient`.
"""

from __future__ import annotations

from typing import Any

from .messages import Target, TargetKind

__all__ = ["BROADCAST_KEY", "WORKER_KEY", "SequenceIn", "SequenceOut"]

#: Event-map key of the broadcast counter (targets all and others).
BROADCAST_KEY = "sb"
#: Event-map key of the per-target-worker counter.
WORKER_KEY = "sw"


class SequenceOut:
    """The publisher's counters. ``assign`` is undone with ``rollback`` when the publish
    that got the number was refused after all (buffer full), so refusals leave no gaps."""

    __slots__ = ("_last", "broadcast", "workers")

    def __init__(self) -> None:
        self.broadcast = 0
        self.workers: dict[int, int] = {}
        self._last: tuple[str, int] | None = None

    def assign(self, target: Target) -> tuple[str, int] | None:
        """The ``(key, number)`` to put in the next event for ``target``, or None."""
        kind = target.kind
        if kind is TargetKind.ALL or kind is TargetKind.OTHERS:
            self.broadcast += 1
            self._last = (BROADCAST_KEY, -1)
            return BROADCAST_KEY, self.broadcast
        if kind is TargetKind.WORKER and target.worker_id is not None:
            n = self.workers.get(target.worker_id, 0) + 1
            self.workers[target.worker_id] = n
            self._last = (WORKER_KEY, target.worker_id)
            return WORKER_KEY, n
        self._last = None
        return None

    def rollback(self) -> None:
        """Take back the number handed out by the latest :meth:`assign`."""
        last, self._last = self._last, None
        if last is None:
            return
        key, wid = last
        if key == BROADCAST_KEY:
            self.broadcast -= 1
        else:
            self.workers[wid] -= 1

    def commit(self) -> None:
        self._last = None

    def marks(self) -> dict[str, object]:
        """The ``sync`` marker's data. Map keys must be strings, so the per-worker
        numbers travel as ``[[worker_id, number], ...]``."""
        return {"sb": self.broadcast, "sw": [[k, v] for k, v in sorted(self.workers.items())]}


class SequenceIn:
    """What one receiver has seen of every other publisher's streams.

    Args:
        worker_id: this receiver's id (its own streams are not checked, and only the
            per-worker stream addressed to it is).
    """

    __slots__ = ("_broadcast", "_pids", "_worker", "lost", "unexplained_drops", "worker_id")

    def __init__(self, worker_id: int) -> None:
        self.worker_id = worker_id
        self._broadcast: dict[int, int] = {}
        self._worker: dict[int, int] = {}
        self._pids: dict[int, int] = {}
        #: events found missing and not explained by a ``dropped`` notice
        self.lost = 0
        #: drops the broker reported that no gap has accounted for yet
        self.unexplained_drops = 0

    def dropped(self, count: int) -> None:
        """The broker reported ``count`` events dropped for us (they will show as gaps)."""
        if count > 0:
            self.unexplained_drops += count

    def joined(self, worker_id: int, pid: int) -> None:
        """A worker (re)joined: a new process under an old id restarts its numbering."""
        if self._pids.get(worker_id, pid) != pid:
            self._broadcast.pop(worker_id, None)
            self._worker.pop(worker_id, None)
        self._pids[worker_id] = pid

    def event(self, wid: int, key: str, number: int) -> int:
        """An event numbered ``number`` on stream ``key`` from ``wid``; returns newly lost."""
        if wid == self.worker_id:
            return 0
        return self._step(self._broadcast if key == BROADCAST_KEY else self._worker, wid, number, False)

    def sync(self, wid: int, data: Any) -> int:
        """A ``sync`` marker from ``wid``; returns newly lost events."""
        if wid == self.worker_id or not isinstance(data, dict):
            return 0
        lost = 0
        sb = data.get("sb")
        if isinstance(sb, int) and not isinstance(sb, bool):
            lost += self._step(self._broadcast, wid, sb, True)
        pairs = data.get("sw")
        if isinstance(pairs, list):
            for pair in pairs:
                if (
                    isinstance(pair, list)
                    and len(pair) == 2
                    and pair[0] == self.worker_id
                    and isinstance(pair[1], int)
                ):
                    lost += self._step(self._worker, wid, pair[1], True)
        return lost

    def _step(self, last: dict[int, int], wid: int, number: int, marker: bool) -> int:
        # A marker says "my latest number is N" (N itself was already sent); an event *is*
        # number N, so after it the expected next is N + 1.
        previous = last.get(wid)
        last[wid] = number
        if previous is None or number <= previous:
            # First sight sets the baseline; going backwards means the publisher restarted
            # (or resent a batch after a failed write): start over from here.
            return 0
        gap = number - previous - (0 if marker else 1)
        if gap <= 0:
            return 0
        explained = min(gap, self.unexplained_drops)
        self.unexplained_drops -= explained
        self.lost += gap - explained
        return gap - explained
