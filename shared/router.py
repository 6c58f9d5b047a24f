"""The broker's routing core, pure and synchronous (docs/protocol.md §5).

It owns one bounded queue of ready-to-send frames per worker id, decides which queues a
publish lands in (all / others / worker / unique with dedup), and counts everything. It
knows nothing about sockets: the broker feeds it publishes and drains the queues.

Invariants:
- A publish is framed once; every queue it lands in holds the same ``bytes`` object.
- Queues are keyed by worker id and outlive a disconnect (a grace period, or forever for
  the ids the broker was told to expect), so a reconnecting or late worker gets what was
  published meanwhile.
- Nothing is dropped silently: every frame that does not reach a queue is counted, per
  worker where there is one.

The bridge seam: ``taps`` are called with every publish a local worker made (after routing),
and :meth:`Router.route` with ``publisher=None`` injects an event from elsewhere (e.g. another
host). Neither requires decoding the event.
"""

from __future__ import annotations

import enum
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from .messages import Target, TargetKind

__all__ = [
    "DEFAULT_MAX_QUEUE_LEN",
    "DEFAULT_MAX_UNIQUE_KEYS",
    "DEFAULT_QUEUE_GRACE",
    "DEFAULT_UNIQUE_TIMEOUT",
    "OverflowPolicy",
    "QueueStatistics",
    "Router",
    "RouterStatistics",
    "WorkerQueue",
]

#: Same as lua-resty-events' ``max_queue_len`` default (1024 * 10).
DEFAULT_MAX_QUEUE_LEN = 10240
#: Same as lua-resty-events' ``unique_timeout`` default, in seconds.
DEFAULT_UNIQUE_TIMEOUT = 5.0
#: How long the queue of a worker that went away is kept for it (the contract asks for at
#: least 30 s): long enough for a respawn, short enough that dead ids do not pile up.
DEFAULT_QUEUE_GRACE = 60.0
#: Unique keys remembered at once. lua-resty-events keeps 1024 in an LRU, which lets a burst
#: of distinct keys evict a live one; we keep more and count every early eviction.
DEFAULT_MAX_UNIQUE_KEYS = 65536


class OverflowPolicy(enum.Enum):
    """What a full worker queue does with one more frame. Either way it is counted."""

    DROP_NEWEST = "drop-newest"  #: refuse the new frame (lua-resty-events' behaviour)
    DROP_OLDEST = "drop-oldest"  #: discard the oldest queued frame to make room


@dataclass(frozen=True, slots=True)
class QueueStatistics:
    worker_id: int
    connected: bool
    depth: int
    enqueued: int
    sent: int
    dropped: int


@dataclass(frozen=True, slots=True)
class RouterStatistics:
    publishes: int
    deliveries: int
    dropped: int
    unique_duplicates: int
    unique_evicted: int
    unroutable: int
    queues: tuple[QueueStatistics, ...]


class WorkerQueue:
    """The frames waiting for one worker id.

    ``wakeup`` is set by whoever drains the queue while it waits for frames; the queue calls
    it on the first push so the writer wakes once per batch, not once per frame.
    """

    __slots__ = (
        "connected",
        "dropped",
        "dropped_unreported",
        "enqueued",
        "expected",
        "frames",
        "idle_since",
        "max_len",
        "sent",
        "wakeup",
        "worker_id",
    )

    def __init__(self, worker_id: int, max_len: int, *, expected: bool, now: float) -> None:
        self.worker_id = worker_id
        self.max_len = max_len
        self.expected = expected
        self.frames: deque[bytes] = deque()
        self.connected = False
        self.idle_since = now
        self.enqueued = 0
        self.sent = 0
        self.dropped = 0
        #: Drops the worker has not been told about yet (see Broker: "dropped" event).
        self.dropped_unreported = 0
        self.wakeup: Callable[[], None] | None = None

    def push(self, frame: bytes, policy: OverflowPolicy) -> bool:
        frames = self.frames
        if len(frames) >= self.max_len:
            self.dropped += 1
            self.dropped_unreported += 1
            if policy is OverflowPolicy.DROP_NEWEST:
                return False
            frames.popleft()
        frames.append(frame)
        self.enqueued += 1
        if self.wakeup is not None:
            self.wakeup()
            self.wakeup = None
        return True

    def take_all(self) -> list[bytes]:
        """Remove and return every queued frame (one write's worth)."""
        batch = list(self.frames)
        self.frames.clear()
        return batch

    def put_back(self, batch: list[bytes]) -> None:
        """Return an unsent batch to the front, in order (the send failed).

        Like lua-resty-events' ``push_front`` this may exceed ``max_len`` for a moment:
        dropping frames that were already accepted would be a silent loss.
        """
        self.frames.extendleft(reversed(batch))
        if self.wakeup is not None:
            self.wakeup()
            self.wakeup = None

    def statistics(self) -> QueueStatistics:
        return QueueStatistics(
            self.worker_id,
            self.connected,
            len(self.frames),
            self.enqueued,
            self.sent,
            self.dropped,
        )


Tap = Callable[[int, Target, bytes], None]


class Router:
    """Routing state of one broker.

    Args:
        max_queue_len: capacity of each worker queue, in frames.
        unique_timeout: seconds during which a repeated unique key is dropped.
        expected_workers: pre-create queues for ids ``0..expected_workers-1``, kept forever.
        queue_grace: seconds a queue of a disconnected, unexpected id is kept.
        overflow: what a full queue does.
        clock, rng: injected for tests.
    """

    def __init__(
        self,
        *,
        max_queue_len: int = DEFAULT_MAX_QUEUE_LEN,
        unique_timeout: float = DEFAULT_UNIQUE_TIMEOUT,
        expected_workers: int = 0,
        queue_grace: float = DEFAULT_QUEUE_GRACE,
        max_unique_keys: int = DEFAULT_MAX_UNIQUE_KEYS,
        overflow: OverflowPolicy = OverflowPolicy.DROP_NEWEST,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if max_queue_len < 1:
            raise ValueError("max_queue_len must be at least 1")
        if unique_timeout <= 0:
            raise ValueError("unique_timeout must be greater than 0")
        if expected_workers < 0:
            raise ValueError("expected_workers must not be negative")
        self.max_queue_len = max_queue_len
        self.unique_timeout = unique_timeout
        self.queue_grace = queue_grace
        self.max_unique_keys = max_unique_keys
        self.overflow = overflow
        self._clock = clock
        self._rng = rng or random.Random()
        self.queues: dict[int, WorkerQueue] = {}
        self._uniques: OrderedDict[str, float] = OrderedDict()
        self.taps: list[Tap] = []
        self.publishes = 0
        self.deliveries = 0
        self.unique_duplicates = 0
        self.unique_evicted = 0
        self.unroutable = 0
        #: Drops of queues that were retired by expire(), so totals never go down.
        self._retired_dropped = 0
        now = clock()
        for wid in range(expected_workers):
            self.queues[wid] = WorkerQueue(wid, max_queue_len, expected=True, now=now)

    # --- membership ----------------------------------------------------------------------

    def attach(self, worker_id: int) -> WorkerQueue:
        """A connection for ``worker_id`` was established: return its (possibly old) queue."""
        queue = self.queues.get(worker_id)
        if queue is None:
            queue = WorkerQueue(worker_id, self.max_queue_len, expected=False, now=self._clock())
            self.queues[worker_id] = queue
        queue.connected = True
        return queue

    def detach(self, queue: WorkerQueue) -> None:
        """The connection of ``queue`` ended; the queue waits for the worker to come back."""
        queue.connected = False
        queue.wakeup = None
        queue.idle_since = self._clock()

    def expire(self) -> list[int]:
        """Drop the queues whose grace period is over; return their ids.

        Frames still queued in them are counted as dropped.
        """
        deadline = self._clock() - self.queue_grace
        gone = [
            q.worker_id
            for q in self.queues.values()
            if not q.connected and not q.expected and q.idle_since <= deadline
        ]
        for wid in gone:
            queue = self.queues.pop(wid)
            queue.dropped += len(queue.frames)
            self._retired_dropped += queue.dropped
        return gone

    # --- routing -------------------------------------------------------------------------

    def route(self, publisher: int | None, target: Target, frame: bytes) -> int:
        """Queue ``frame`` (a whole delivery frame) for the workers ``target`` names.

        ``publisher`` is the publishing worker's id, or None for an event injected from
        outside this broker. Returns the number of queues the frame landed in.
        """
        self.publishes += 1
        kind = target.kind
        policy = self.overflow
        landed = 0
        if kind is TargetKind.ALL:
            for queue in self.queues.values():
                landed += queue.push(frame, policy)
        elif kind is TargetKind.OTHERS:
            for queue in self.queues.values():
                if queue.worker_id != publisher:
                    landed += queue.push(frame, policy)
        elif kind is TargetKind.WORKER:
            queue = self.queues.get(target.worker_id)  # type: ignore[arg-type]
            if queue is None:
                self.unroutable += 1
            else:
                landed = queue.push(frame, policy)
        elif kind is TargetKind.UNIQUE:
            landed = self._route_unique(target.key or "", frame)
        else:
            raise ValueError(f"target {target} is never routed by a broker")
        self.deliveries += landed
        if publisher is not None and self.taps:
            for tap in self.taps:
                tap(publisher, target, frame)
        return landed

    def _route_unique(self, key: str, frame: bytes) -> int:
        now = self._clock()
        uniques = self._uniques
        # Keys are inserted in time order with one timeout, so expired ones are at the front.
        while uniques:
            oldest_key, expires = next(iter(uniques.items()))
            if expires > now:
                break
            del uniques[oldest_key]
        if key in uniques:
            self.unique_duplicates += 1
            return 0
        if len(uniques) >= self.max_unique_keys:
            uniques.popitem(last=False)
            self.unique_evicted += 1
        uniques[key] = now + self.unique_timeout
        queue = self._pick_one()
        if queue is None:
            self.unroutable += 1
            return 0
        return int(queue.push(frame, self.overflow))

    def _pick_one(self) -> WorkerQueue | None:
        # Prefer a connected regular worker, so the event is handled now rather than when
        # some absent worker comes back; fall back to any queue at all.
        queues = list(self.queues.values())
        for candidates in (
            [q for q in queues if q.connected and q.worker_id >= 0],
            [q for q in queues if q.connected],
            queues,
        ):
            if candidates:
                return self._rng.choice(candidates)
        return None

    # --- introspection -------------------------------------------------------------------

    def statistics(self) -> RouterStatistics:
        queues = tuple(q.statistics() for q in sorted(self.queues.values(), key=_by_id))
        return RouterStatistics(
            publishes=self.publishes,
            deliveries=self.deliveries,
            dropped=self._retired_dropped + sum(q.dropped for q in queues),
            unique_duplicates=self.unique_duplicates,
            unique_evicted=self.unique_evicted,
            unroutable=self.unroutable,
            queues=queues,
        )


def _by_id(queue: WorkerQueue) -> int:
    return queue.worker_id
