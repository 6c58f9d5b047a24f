"""The broker's routing core, pure and synchronous (docs/protocol.md §5).

It owns one bounded queue of ready-to-send frames per worker id, decides which queues a
publish lands in (all / others / worker / unique with dedup), and counts everything. It
knows nothing about sockets: the broker feeds it publishes and drains the queues.

Invariants:
- A publish is framed once; every queue it lands in holds the same ``bytes`` object.
- Queues are keyed by worker id and outlive a disconnect (a grace period, or forever for
  the ids the broker was told to expect), so a reconnecting or late worker gets what was
  published meanwhile.
- A broadcast costs in proportion to the queues of workers that are connected, expected,
  or gone for less than ``broadcast_grace``; never to every id ever seen. The queue of a
  departed, unexpected id stops taking broadcasts after that short grace (it is *muted*:
  what it misses is counted, not copied, and reported as dropped if the worker returns),
  and at most ``max_departed_queues`` such queues are kept, the oldest retired first.
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
from bisect import bisect_right
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import accumulate, chain, compress, islice, repeat

from .messages import RunKeys, Target, TargetKind

__all__ = [
    "DEFAULT_BROADCAST_GRACE",
    "DEFAULT_MAX_BATCH_BYTES",
    "DEFAULT_MAX_DEPARTED_QUEUES",
    "DEFAULT_MAX_QUEUE_LEN",
    "DEFAULT_MAX_UNIQUE_KEYS",
    "DEFAULT_QUEUE_GRACE",
    "DEFAULT_UNIQUE_TIMEOUT",
    "MAX_EXPECTED_WORKERS",
    "OverflowPolicy",
    "QueueStatistics",
    "Router",
    "RouterStatistics",
    "Patterns",
    "WorkerQueue",
    "matches",
]

#: Same as lua-resty-events' ``max_queue_len`` default (1024 * 10).
DEFAULT_MAX_QUEUE_LEN = 10240
#: Most ids a broker pre-creates queues for (``expected_workers``, ``--workers N``). Each is
#: kept forever and takes a copy of every broadcast; 4096 is far beyond any one server's
#: worker processes, and a typo such as 100000000 is refused before ~1 KiB per queue is spent.
MAX_EXPECTED_WORKERS = 4096
#: Same as lua-resty-events' ``unique_timeout`` default, in seconds.
DEFAULT_UNIQUE_TIMEOUT = 5.0
#: How long the queue of a worker that went away is kept for it (the contract asks for at
#: least 30 s): long enough for a respawn, short enough that dead ids do not pile up.
DEFAULT_QUEUE_GRACE = 60.0
#: How long the queue of a departed worker whose id the broker was not told to expect keeps
#: taking broadcasts. A worker that reconnects within it (a broken connection, a quick
#: respawn) misses nothing; past it, the queue costs nothing per broadcast and the worker
#: is told how many events it missed. Expected ids (``--workers N``) are never muted.
DEFAULT_BROADCAST_GRACE = 5.0
#: Queues kept for departed workers whose ids the broker was not told to expect. Over it,
#: the queue of the worker that left first is retired at once (counted in
#: ``queues_evicted``, what it held counted as dropped). Twice the workers of a big server
#: (and ``--workers N`` ids do not count): ids that come and go faster are ghosts, not
#: respawns. Each one kept costs up to ``max_queue_len`` pointers (80 KiB by default) and,
#: within its broadcast grace, a copy of every broadcast.
DEFAULT_MAX_DEPARTED_QUEUES = 128
#: Unique keys remembered at once. lua-resty-events keeps 1024 in an LRU, which lets a burst
#: of distinct keys evict a live one; we keep more and count every early eviction.
DEFAULT_MAX_UNIQUE_KEYS = 65536
#: Bytes one writer takes from a queue for one ``send``. The batch is joined into one
#: buffer per connection, so this bounds the copy a stuck reader can pin (the frames
#: themselves are shared between queues); 256 KiB matches the broker's read size.
DEFAULT_MAX_BATCH_BYTES = 256 * 1024

#: Runs an iterator to its end, keeping nothing (a C-level loop).
_SINK: deque[object] = deque(maxlen=0)
_consume = _SINK.extend


class OverflowPolicy(enum.Enum):
    """What a full worker queue does with one more frame. Either way it is counted."""

    DROP_NEWEST = "drop-newest"  #: refuse the new frame (lua-resty-events' behaviour)
    DROP_OLDEST = "drop-oldest"  #: discard the oldest queued frame to make room
    #: cut the slow worker off: its backlog (and the batch being written) is discarded and
    #: counted, its connection closed; it reconnects, is told the count, and goes on with
    #: what is published from then on. While it has no connection, the queue drops newest.
    DISCONNECT = "disconnect"


@dataclass(frozen=True, slots=True)
class QueueStatistics:
    """One worker id's queue. ``routed == sent + dropped + depth + in_flight`` always holds."""

    worker_id: int
    connected: bool
    #: frames waiting in the queue
    depth: int
    #: frames accepted into the queue
    enqueued: int
    #: frames written to the worker's connection
    sent: int
    #: frames lost for this worker, whatever the reason (overflow, cut, expiry)
    dropped: int
    #: frames the router offered to this queue
    routed: int = 0
    #: frames taken by the writer whose ``send`` has not finished
    in_flight: int = 0
    #: connections closed by the disconnect overflow policy
    overflow_disconnects: int = 0
    #: frames not offered to this queue because its worker's filter does not match them
    #: (docs/protocol.md §8): not routed, so outside the identity, and never a drop
    filtered: int = 0


@dataclass(frozen=True, slots=True)
class RouterStatistics:
    """Totals over every queue, including queues retired after their grace period:
    ``routed == sent + dropped + abandoned + queued + in_flight``."""

    publishes: int
    deliveries: int
    dropped: int
    unique_duplicates: int
    unique_evicted: int
    unroutable: int
    queues: tuple[QueueStatistics, ...]
    routed: int = 0
    sent: int = 0
    queued: int = 0
    in_flight: int = 0
    overflow_disconnects: int = 0
    #: queues of departed, unexpected ids kept now (muted ones included)
    queues_departed: int = 0
    #: of those, muted: past ``broadcast_grace``, they take no more broadcasts
    queues_muted: int = 0
    #: queues retired at the end of ``queue_grace``, in all
    queues_expired: int = 0
    #: queues retired early because ``max_departed_queues`` were kept, in all
    queues_evicted: int = 0
    #: deliveries skipped by worker filters (docs/protocol.md §8), in all; never drops
    filtered: int = 0
    #: queues of departed workers whose process ended, retired at once (:meth:`Router.release`)
    queues_released: int = 0
    #: frames held in those queues, or broadcasts they missed while muted: nobody was left
    #: to receive them, so they are not drops
    abandoned: int = 0


#: A worker's filter: its (source, event) patterns, "*" as in the dispatcher's levels.
Patterns = frozenset[tuple[str, str]]
#: Events of the bus itself pass every filter (docs/protocol.md §8).
_BUS_SOURCE = "workerbus"


def matches(patterns: Patterns | None, source: str, event: str) -> bool:
    """Whether a worker with this filter (None: no filter) handles ``(source, event)``."""
    return (
        patterns is None
        or source == _BUS_SOURCE
        or ("*", "*") in patterns
        or (source, "*") in patterns
        or (source, event) in patterns
    )


class WorkerQueue:
    """The frames waiting for one worker id.

    ``wakeup`` is set by whoever drains the queue while it waits for frames; the queue calls
    it on the first push so the writer wakes once per batch, not once per frame.
    """

    __slots__ = (
        "connected",
        "disconnects",
        "dropped",
        "dropped_unreported",
        "enqueued",
        "expected",
        "filter",
        "filtered",
        "frames",
        "idle_since",
        "in_flight",
        "max_len",
        "muted_at",
        "muted_skips",
        "on_overflow",
        "routed",
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
        self.routed = 0
        self.in_flight = 0
        self.disconnects = 0
        #: Set by the broker while connected: closes the connection (disconnect policy).
        self.on_overflow: Callable[[], None] | None = None
        #: While muted (see Router): the router's broadcast count when it was muted, and
        #: the broadcasts since then that this id itself published to ``others``.
        self.muted_at = -1
        self.muted_skips = 0
        #: The connected worker's patterns (None: everything), see Router.set_filter.
        self.filter: Patterns | None = None
        self.filtered = 0

    def push(self, frame: bytes, policy: OverflowPolicy) -> bool:
        frames = self.frames
        self.routed += 1
        if len(frames) >= self.max_len:
            if policy is OverflowPolicy.DISCONNECT and self.on_overflow is not None:
                self._cut_off()
            else:
                self.dropped += 1
                self.dropped_unreported += 1
                if policy is not OverflowPolicy.DROP_OLDEST:
                    return False  # drop newest; also disconnect with no connection to cut
                frames.popleft()
        frames.append(frame)
        self.enqueued += 1
        if self.wakeup is not None:
            self.wakeup()
            self.wakeup = None
        return True

    def push_many(self, frames: list[bytes], policy: OverflowPolicy) -> int:
        """:meth:`push` for several frames, in order; returns how many were queued.

        With room for all of them this is one ``extend`` (the broker routes a whole read's
        worth of publishes at once); otherwise frame by frame, so the overflow policy
        applies exactly as it would one push at a time.
        """
        count = len(frames)
        queued = self.frames
        if len(queued) + count > self.max_len:
            if policy is OverflowPolicy.DISCONNECT and self.on_overflow is not None:
                return sum(self.push(frame, policy) for frame in frames)
            return self._push_over(frames, policy)
        self.routed += count
        queued.extend(frames)
        self.enqueued += count
        if self.wakeup is not None:
            self.wakeup()
            self.wakeup = None
        return count

    def _push_over(self, frames: list[bytes], policy: OverflowPolicy) -> int:
        # A run that does not fit, in one go (a full queue of a worker that is not reading
        # must not cost a Python call per frame): exactly what push() would leave, frame by
        # frame. Each frame that finds the queue full is dropped (newest) or pops the oldest.
        count = len(frames)
        queued = self.frames
        # No room at all is not the floor: a put_back may leave the queue over max_len for
        # a while (see put_back), and then every frame of the run finds it full.
        room = self.max_len - len(queued) if len(queued) < self.max_len else 0
        lost = count - room
        self.routed += count
        self.dropped += lost
        self.dropped_unreported += lost
        if policy is OverflowPolicy.DROP_OLDEST:
            queued.extend(frames)
            _consume(map(deque.popleft, repeat(queued, lost)))
            accepted = count
        else:  # drop newest; also disconnect with no connection to cut
            if room:
                queued.extend(frames[:room])
            accepted = room
        self.enqueued += accepted
        if accepted and self.wakeup is not None:
            self.wakeup()
            self.wakeup = None
        return accepted

    def _cut_off(self) -> None:
        # Disconnect policy: the backlog is what made the worker too slow, so it goes
        # (counted, and reported when the worker is back); the connection is closed once.
        # The frame that found the queue full is kept: it is the first one after the cut.
        lost = len(self.frames)
        self.frames.clear()
        self.dropped += lost
        self.dropped_unreported += lost
        self.disconnects += 1
        callback, self.on_overflow = self.on_overflow, None
        assert callback is not None
        callback()

    def take_all(self) -> list[bytes]:
        """Remove and return every queued frame (one write's worth).

        Like :meth:`take_batch`, they count as in flight until :meth:`mark_sent` or
        :meth:`put_back`.
        """
        batch = list(self.frames)
        self.frames.clear()
        self.in_flight += len(batch)
        return batch

    def take_batch(self, max_bytes: int = DEFAULT_MAX_BATCH_BYTES) -> list[bytes]:
        """Remove and return the oldest frames up to ``max_bytes`` (at least one frame).

        They count as in flight until :meth:`mark_sent` or :meth:`put_back`.
        """
        frames = self.frames
        total = len(frames)
        # How many of the oldest frames fit, found with C-level helpers (this runs for every
        # write of every connection): running sizes, read a growing chunk at a time so a
        # long backlog is not scanned past the cut, and a bisection per chunk.
        sizes = accumulate(map(len, frames))
        count = 0
        chunk = 256
        while True:
            part = list(islice(sizes, chunk))
            fit = bisect_right(part, max_bytes)
            count += fit
            if fit < len(part) or len(part) < chunk:
                break
            chunk *= 2
        count = max(count, min(total, 1))
        if count == total:
            batch = list(frames)
            frames.clear()
        else:
            # (a C-level loop: popleft count times, without a Python frame per frame)
            batch = list(map(deque.popleft, repeat(frames, count)))
        self.in_flight += count
        return batch

    def discard(self, batch: list[bytes]) -> None:
        """Drop, and count, an unsent batch (its connection was cut: disconnect policy)."""
        self._land(len(batch))
        self.dropped += len(batch)
        self.dropped_unreported += len(batch)

    def mark_sent(self, count: int) -> None:
        """``count`` frames taken by :meth:`take_batch` were written."""
        self._land(count)
        self.sent += count

    def put_back(self, batch: list[bytes]) -> None:
        """Return an unsent batch to the front, in order (the send failed).

        Like lua-resty-events' ``push_front`` this may exceed ``max_len`` for a moment:
        dropping frames that were already accepted would be a silent loss.
        """
        self._land(len(batch))
        self.frames.extendleft(reversed(batch))
        if self.wakeup is not None:
            self.wakeup()
            self.wakeup = None

    def _land(self, count: int) -> None:
        # Frames leave flight only after take_batch/take_all put them there: more would
        # mean a batch reported twice, and the accounting identity is broken.
        assert count <= self.in_flight, f"{count} frames landed, {self.in_flight} in flight"
        self.in_flight -= count

    def statistics(self) -> QueueStatistics:
        return QueueStatistics(
            self.worker_id,
            self.connected,
            len(self.frames),
            self.enqueued,
            self.sent,
            self.dropped,
            self.routed,
            self.in_flight,
            self.disconnects,
            self.filtered,
        )


Tap = Callable[[int, Target, bytes], None]


class Router:
    """Routing state of one broker.

    Args:
        max_queue_len: capacity of each worker queue, in frames.
        unique_timeout: seconds during which a repeated unique key is dropped.
        expected_workers: pre-create queues for ids ``0..expected_workers-1``, kept forever.
        queue_grace: seconds a queue of a disconnected, unexpected id is kept.
        broadcast_grace: seconds such a queue keeps taking broadcasts (then it is muted).
        max_departed_queues: queues of disconnected, unexpected ids kept at once.
        overflow: what a full queue does.
        clock, rng: injected for tests.

    ``queues`` holds the queues a broadcast is copied into: expected ids, connected ids,
    and ids gone for less than ``broadcast_grace``. ``muted`` holds the other departed
    ones until they expire; a ``worker`` target still reaches them (one copy, not one per
    broadcast).
    """

    def __init__(
        self,
        *,
        max_queue_len: int = DEFAULT_MAX_QUEUE_LEN,
        unique_timeout: float = DEFAULT_UNIQUE_TIMEOUT,
        expected_workers: int = 0,
        queue_grace: float = DEFAULT_QUEUE_GRACE,
        broadcast_grace: float = DEFAULT_BROADCAST_GRACE,
        max_departed_queues: int = DEFAULT_MAX_DEPARTED_QUEUES,
        max_unique_keys: int = DEFAULT_MAX_UNIQUE_KEYS,
        overflow: OverflowPolicy = OverflowPolicy.DROP_NEWEST,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if max_queue_len < 1:
            raise ValueError("max_queue_len must be at least 1")
        if unique_timeout <= 0:
            raise ValueError("unique_timeout must be greater than 0")
        if not 0 <= expected_workers <= MAX_EXPECTED_WORKERS:
            raise ValueError(
                f"expected_workers must be 0..{MAX_EXPECTED_WORKERS} (MAX_EXPECTED_WORKERS), "
                f"got {expected_workers}"
            )
        if broadcast_grace < 0:
            raise ValueError("broadcast_grace must not be negative")
        if max_departed_queues < 0:
            raise ValueError("max_departed_queues must not be negative")
        self.max_queue_len = max_queue_len
        self.unique_timeout = unique_timeout
        self.queue_grace = queue_grace
        self.broadcast_grace = broadcast_grace
        self.max_departed_queues = max_departed_queues
        self.max_unique_keys = max_unique_keys
        self.overflow = overflow
        self._clock = clock
        self._rng = rng or random.Random()
        self.queues: dict[int, WorkerQueue] = {}
        self.muted: dict[int, WorkerQueue] = {}
        #: Departed, unexpected ids (muted or not), the one that left first first.
        self._departed: dict[int, WorkerQueue] = {}
        #: Broadcast frames routed so far: what a muted queue misses is counted from this.
        self._broadcasts = 0
        self._uniques: OrderedDict[str, float] = OrderedDict()
        self.taps: list[Tap] = []
        #: Set by a cluster bridge: a unique publish with cluster scope is not routed here
        #: but left to the taps (the bridge claims the key cluster-wide first). Without a
        #: bridge this broker is a cluster of one node and routes it like any unique.
        self.defer_cluster_unique = False
        self.publishes = 0
        self.deliveries = 0
        self.unique_duplicates = 0
        self.unique_evicted = 0
        self.unroutable = 0
        self.queues_expired = 0
        self.queues_evicted = 0
        self.queues_released = 0
        self._abandoned = 0
        #: Per (source, event): the queues (of ``queues``) whose filter takes it, and those
        #: whose filter skips it. Emptied whenever a filter or the set of queues changes.
        self._matching: dict[tuple[str, str], _Split] = {}
        #: Per (pairs of a run, publisher): which queue takes which (see _take_keyed);
        #: made of the splits above, so emptied with them.
        self._plans: dict[tuple[tuple[tuple[str, str] | None, ...], int | None], _Plan] = {}
        self._retired_filtered = 0
        #: Counters of queues that were retired by expire(), so totals never go down.
        self._retired_dropped = 0
        self._retired_routed = 0
        self._retired_sent = 0
        self._retired_disconnects = 0
        now = clock()
        for wid in range(expected_workers):
            self.queues[wid] = WorkerQueue(wid, max_queue_len, expected=True, now=now)

    # --- membership ----------------------------------------------------------------------

    def attach(self, worker_id: int) -> WorkerQueue:
        """A connection for ``worker_id`` was established: return its (possibly old) queue."""
        queue = self.queues.get(worker_id)
        if queue is None:
            queue = self.muted.pop(worker_id, None)
            if queue is None:
                queue = WorkerQueue(worker_id, self.max_queue_len, expected=False, now=self._clock())
            else:
                self._unmute(queue)
            self.queues[worker_id] = queue
            self._invalidate()
        self._departed.pop(worker_id, None)
        queue.connected = True
        return queue

    def set_filter(self, queue: WorkerQueue, patterns: Patterns | None) -> None:
        """The connected worker of ``queue`` handles only ``patterns`` (None: everything).

        Takes effect for every frame routed from now on; frames already queued stay.
        """
        queue.filter = patterns
        self._invalidate()

    def detach(self, queue: WorkerQueue) -> list[int]:
        """The connection of ``queue`` ended; the queue waits for the worker to come back.

        Returns the ids whose queues were retired early to stay within
        ``max_departed_queues`` (the oldest departures first).
        """
        queue.connected = False
        queue.wakeup = None
        queue.on_overflow = None
        if queue.filter is not None:
            # The filter belonged to the connection: what waits for the next one (perhaps
            # another process with other handlers) is everything, as without filters.
            queue.filter = None
            self._invalidate()
        queue.idle_since = self._clock()
        if queue.expected:
            return []
        departed = self._departed
        departed.pop(queue.worker_id, None)
        departed[queue.worker_id] = queue
        evicted = []
        while len(departed) > self.max_departed_queues:
            oldest = next(iter(departed.values()))
            self._retire(oldest)
            self.queues_evicted += 1
            evicted.append(oldest.worker_id)
        return evicted

    def expire(self) -> list[int]:
        """Mute the departed queues past ``broadcast_grace``, and drop those whose
        ``queue_grace`` is over; return the ids dropped.

        Frames still queued in them are counted as dropped.
        """
        now = self._clock()
        mute_by = now - self.broadcast_grace
        retire_by = now - self.queue_grace
        gone = []
        for queue in list(self._departed.values()):  # in the order they left
            if queue.idle_since > mute_by and queue.idle_since > retire_by:
                break
            if queue.idle_since <= retire_by:
                self._retire(queue)
                self.queues_expired += 1
                gone.append(queue.worker_id)
            elif queue.muted_at < 0:
                del self.queues[queue.worker_id]
                self._invalidate()
                self.muted[queue.worker_id] = queue
                queue.muted_at = self._broadcasts
                queue.muted_skips = 0
        return gone

    def is_departed(self, worker_id: int) -> bool:
        """Whether ``worker_id`` has a queue waiting for its worker to come back."""
        return worker_id in self._departed

    def release(self, worker_id: int) -> bool:
        """The departed ``worker_id`` will never come back (the process it belonged to has
        ended): retire its queue now rather than at the end of ``queue_grace``.

        What the queue holds, and the broadcasts it missed while muted, had nobody left to
        receive them: they are counted as ``abandoned``, not as dropped (a one-shot
        ``workerbus publish`` would otherwise add every broadcast of the next minute to
        the broker's drops). Returns False if ``worker_id`` has no departed queue.
        """
        queue = self._departed.pop(worker_id, None)
        if queue is None:
            return False
        missed = 0
        if queue.muted_at >= 0:
            missed = self._broadcasts - queue.muted_at - queue.muted_skips
            queue.muted_at = -1
            del self.muted[worker_id]
        else:
            del self.queues[worker_id]
            self._invalidate()
        held = len(queue.frames) + queue.in_flight
        queue.frames.clear()
        self.queues_released += 1
        self._abandoned += missed + held
        self._retired_dropped += queue.dropped
        self._retired_routed += queue.routed + missed
        self._retired_sent += queue.sent
        self._retired_disconnects += queue.disconnects
        self._retired_filtered += queue.filtered
        return True

    def _unmute(self, queue: WorkerQueue) -> None:
        self._settle(queue)
        queue.muted_at = -1

    def _settle(self, queue: WorkerQueue) -> None:
        # Count what a muted queue missed so far as offered to it and dropped (and to be
        # reported to its worker), as if each broadcast had found it full.
        missed = self._broadcasts - queue.muted_at - queue.muted_skips
        queue.routed += missed
        queue.dropped += missed
        queue.dropped_unreported += missed
        queue.muted_at = self._broadcasts
        queue.muted_skips = 0

    def _retire(self, queue: WorkerQueue) -> None:
        wid = queue.worker_id
        if queue.muted_at >= 0:
            self._settle(queue)
            del self.muted[wid]
        else:
            del self.queues[wid]
            self._invalidate()
        self._departed.pop(wid, None)
        queue.dropped += len(queue.frames) + queue.in_flight
        queue.frames.clear()
        self._retired_dropped += queue.dropped
        self._retired_routed += queue.routed
        self._retired_sent += queue.sent
        self._retired_disconnects += queue.disconnects
        self._retired_filtered += queue.filtered

    # --- routing -------------------------------------------------------------------------

    def _split(self, key: tuple[str, str]) -> _Split:
        """The queues whose filter takes ``key``, and those whose filter skips it (cached)."""
        split = self._matching.get(key)
        if split is None:
            source, event = key
            take: list[WorkerQueue] = []
            skip: list[WorkerQueue] = []
            for queue in self.queues.values():
                (take if matches(queue.filter, source, event) else skip).append(queue)
            split = self._matching[key] = _Split(tuple(take), tuple(skip))
        return split

    def _targets(self, key: tuple[str, str] | None, count: int) -> Iterable[WorkerQueue]:
        # The queues a broadcast of ``count`` frames with this key goes to; the others
        # count them as filtered (once per key, added to each skipped queue later).
        if key is None:
            return self.queues.values()
        split = self._split(key)
        split.skipped += count
        return split.take

    def _invalidate(self) -> None:
        # A filter or the set of queues changed: settle the filtered counts, forget splits.
        for split in self._matching.values():
            if split.skipped:
                for queue in split.skip:
                    queue.filtered += split.skipped
        self._matching.clear()
        self._plans.clear()

    def route(
        self, publisher: int | None, target: Target, frame: bytes, key: tuple[str, str] | None = None
    ) -> int:
        """Queue ``frame`` (a whole delivery frame) for the workers ``target`` names.

        ``publisher`` is the publishing worker's id, or None for an event injected from
        outside this broker. ``key`` is the event's ``(source, event)`` when the publisher
        said it (docs/protocol.md §8): workers whose filter does not take it are skipped
        (counted as filtered); None reaches every worker the target names. Returns the
        number of queues the frame landed in.
        """
        self.publishes += 1
        kind = target.kind
        policy = self.overflow
        landed = 0
        if kind is TargetKind.ALL:
            self._broadcasts += 1
            for queue in self._targets(key, 1):
                landed += queue.push(frame, policy)
        elif kind is TargetKind.OTHERS:
            self._broadcasts += 1
            if self.muted:
                self._others_from_muted(publisher, 1)
            for queue in self._targets(key, 1):
                if queue.worker_id != publisher:
                    landed += queue.push(frame, policy)
        elif kind is TargetKind.WORKER:
            wid: int = target.worker_id  # type: ignore[assignment]
            one = self.queues.get(wid) or self.muted.get(wid)
            if one is None:
                self.unroutable += 1
            elif key is not None and not matches(one.filter, *key):
                one.filtered += 1  # the worker does not handle it: not a drop
            else:
                landed = one.push(frame, policy)
        elif kind is TargetKind.UNIQUE:
            if target.cluster and self.defer_cluster_unique and publisher is not None:
                landed = 0
            else:
                landed = self._route_unique(target.key or "", frame, key)
        else:
            raise ValueError(f"target {target} is never routed by a broker")
        self.deliveries += landed
        if publisher is not None and self.taps:
            for tap in self.taps:
                tap(publisher, target, frame)
        return landed

    def route_many(
        self, publisher: int | None, target: Target, frames: list[bytes], key: tuple[str, str] | None = None
    ) -> int:
        """:meth:`route` for several frames with one target (and one key), in order.

        For ``all`` and ``others`` every queue takes the whole run in one go, which is what
        keeps the broker's cost per delivery low; other targets go frame by frame.
        """
        kind = target.kind
        if len(frames) == 1 or (kind is not TargetKind.ALL and kind is not TargetKind.OTHERS):
            return sum(self.route(publisher, target, frame, key) for frame in frames)
        self.publishes += len(frames)
        policy = self.overflow
        landed = 0
        self._broadcasts += len(frames)
        if kind is TargetKind.ALL:
            for queue in self._targets(key, len(frames)):
                landed += queue.push_many(frames, policy)
        else:
            if self.muted:
                self._others_from_muted(publisher, len(frames))
            for queue in self._targets(key, len(frames)):
                if queue.worker_id != publisher:
                    landed += queue.push_many(frames, policy)
        self.deliveries += landed
        if publisher is not None and self.taps:
            for frame in frames:
                for tap in self.taps:
                    tap(publisher, target, frame)
        return landed

    def route_runs(
        self,
        publisher: int | None,
        runs: list[tuple[Target, list[bytes]]],
        keys: list[RunKeys | None] | None = None,
    ) -> int:
        """:meth:`route` for every frame of one read's runs, in order.

        ``keys`` (a connection granted ``filter``): one entry per run, as
        :func:`~shared.messages.decode_publish_batch` makes them; None routes the run
        unkeyed. Broadcast runs are not pushed run by run: each queue collects what it
        takes, in read order, and takes it in one :meth:`WorkerQueue.push_many` at the end
        (or before a run with another kind of target, which goes frame by frame). In a run
        of several ``(source, event)`` pairs a queue's share is found per pair, not per
        frame (:meth:`_take_keyed`). Each queue ends with the same frames in the same
        order, and every counter the same, as with frame-by-frame routing: a queue's
        pushes are in read order, and the overflow policy of ``push_many`` is exactly that
        of one push at a time.
        """
        landed = 0
        broadcast = 0
        # queue -> the frame lists it takes so far, in order (the runs themselves, not copies)
        pending: defaultdict[WorkerQueue, list[list[bytes]]] = defaultdict(list)
        matching = self._matching
        for index, (target, frames) in enumerate(runs):
            kind = target.kind
            run_keys = None if keys is None else keys[index]
            if kind is not TargetKind.ALL and kind is not TargetKind.OTHERS:
                if pending:
                    landed += self._push_pending(pending)
                if run_keys is None:
                    landed += self.route_many(publisher, target, frames)
                else:
                    for i, frame in enumerate(frames):
                        landed += self.route(publisher, target, frame, run_keys.key_of(i))
                continue
            count = len(frames)
            broadcast += count
            if run_keys is not None and len(run_keys.names) > 1:
                self._take_keyed(publisher, kind is TargetKind.OTHERS, frames, run_keys, pending)
            else:
                key = None if run_keys is None else run_keys.names[0]
                targets: Iterable[WorkerQueue]
                if key is None:
                    targets = self.queues.values()
                    if kind is TargetKind.OTHERS:
                        targets = [queue for queue in targets if queue.worker_id != publisher]
                else:
                    split = matching.get(key) or self._split(key)
                    split.skipped += count
                    targets = split.take if kind is TargetKind.ALL else split.others(publisher)
                # (a C-level loop: each target queue's list of runs takes this one)
                _consume(map(list.append, map(pending.__getitem__, targets), repeat(frames)))
            if kind is TargetKind.OTHERS and self.muted:
                self._others_from_muted(publisher, count)
            if publisher is not None and self.taps:
                for frame in frames:
                    for tap in self.taps:
                        tap(publisher, target, frame)
        self.publishes += broadcast
        self._broadcasts += broadcast
        if pending:
            landed += self._push_pending(pending)
        return landed

    def _take_keyed(
        self,
        publisher: int | None,
        others: bool,
        frames: list[bytes],
        run_keys: RunKeys,
        pending: defaultdict[WorkerQueue, list[list[bytes]]],
    ) -> None:
        # A broadcast run of several pairs: which queue takes which pairs is worked out once
        # per (pairs, publisher) and kept (_Plan); the frames of each pair are gathered in
        # one C-level pass. A queue that takes every pair takes the run as it is; one pair,
        # that pair's frames; some pairs, the run filtered by a C-level mask.
        names, index = run_keys.names, run_keys.index
        plan_key = (tuple(names), publisher if others else _ANY)
        plan = self._plans.get(plan_key)
        if plan is None:
            plan = self._plan(names, publisher, others)
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            self._plans[plan_key] = plan
        groups: list[list[bytes]] = [[] for _ in names]
        _consume(map(list.append, map(groups.__getitem__, index), frames))
        for position, split in plan.splits:
            split.skipped += len(groups[position])
        for queue in plan.every:
            pending[queue].append(frames)
        for queue, position in plan.one:
            pending[queue].append(groups[position])
        for queue, positions in plan.some:
            pending[queue].append(list(compress(frames, map(positions.__contains__, index))))

    def _plan(self, names: list[tuple[str, str] | None], publisher: int | None, others: bool) -> _Plan:
        taken: dict[WorkerQueue, list[int]] = {}
        splits: list[tuple[int, _Split]] = []
        for position, name in enumerate(names):
            if name is None:  # a publish without src/ev: every queue the target names
                takers: Iterable[WorkerQueue] = self.queues.values()
                if others:
                    takers = [queue for queue in takers if queue.worker_id != publisher]
            else:
                split = self._split(name)
                splits.append((position, split))
                takers = split.others(publisher) if others else split.take
            for queue in takers:
                taken.setdefault(queue, []).append(position)
        plan = _Plan(splits)
        for queue, positions in taken.items():
            if len(positions) == len(names):
                plan.every.append(queue)
            elif len(positions) == 1:
                plan.one.append((queue, positions[0]))
            else:
                plan.some.append((queue, frozenset(positions)))
        return plan

    def _push_pending(self, pending: defaultdict[WorkerQueue, list[list[bytes]]]) -> int:
        # Each queue takes what it collected in one go; emptied for the next collection.
        policy = self.overflow
        landed = 0
        for queue, held in pending.items():
            landed += queue.push_many(held[0] if len(held) == 1 else list(chain.from_iterable(held)), policy)
        pending.clear()
        self.deliveries += landed
        return landed

    def _others_from_muted(self, publisher: int | None, count: int) -> None:
        # A muted id publishing to ``others`` (only the pure router allows a publisher that
        # is not connected) would not have received those: they are not counted as missed.
        queue = self.muted.get(publisher) if publisher is not None else None
        if queue is not None:
            queue.muted_skips += count

    def _route_unique(self, key: str, frame: bytes, match: tuple[str, str] | None = None) -> int:
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
        # Only workers that handle the event are candidates; none that does: unroutable
        # (without filters it would reach a worker with no handler for it: lost as well).
        queue = self._pick_one(self.queues.values() if match is None else self._split(match).take)
        if queue is None:
            self.unroutable += 1
            return 0
        return int(queue.push(frame, self.overflow))

    def _pick_one(self, among: Iterable[WorkerQueue]) -> WorkerQueue | None:
        # Prefer a connected regular worker, so the event is handled now rather than when
        # some absent worker comes back; fall back to any queue that takes broadcasts
        # (expected ids, ids gone for less than broadcast_grace), never a muted one.
        queues = list(among)
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
        self._invalidate()  # (settles the filtered counts of every queue)
        for queue in self.muted.values():
            self._settle(queue)  # so that the identity holds in every snapshot
        every = [*self.queues.values(), *self.muted.values()]
        queues = tuple(q.statistics() for q in sorted(every, key=_by_id))
        return RouterStatistics(
            publishes=self.publishes,
            deliveries=self.deliveries,
            dropped=self._retired_dropped + sum(q.dropped for q in queues),
            unique_duplicates=self.unique_duplicates,
            unique_evicted=self.unique_evicted,
            unroutable=self.unroutable,
            queues=queues,
            routed=self._retired_routed + sum(q.routed for q in queues),
            sent=self._retired_sent + sum(q.sent for q in queues),
            queued=sum(q.depth for q in queues),
            in_flight=sum(q.in_flight for q in queues),
            overflow_disconnects=self._retired_disconnects
            + sum(q.overflow_disconnects for q in queues),
            queues_departed=len(self._departed),
            queues_muted=len(self.muted),
            queues_expired=self.queues_expired,
            queues_evicted=self.queues_evicted,
            filtered=self._retired_filtered + sum(q.filtered for q in queues),
            queues_released=self.queues_released,
            abandoned=self._abandoned,
        )


#: A plan's key for an ``all`` run: the publisher does not matter.
_ANY = -(1 << 62)
#: Plans kept at once (per distinct pairs of a run and publisher); emptied when full.
_MAX_PLANS = 1024


class _Plan:
    """Which queues take which pairs of a run with several ``(source, event)`` pairs:
    every pair, one pair (its position), or some (their positions); and the splits whose
    skipped counts grow by each pair's frames."""

    __slots__ = ("every", "one", "some", "splits")

    def __init__(self, splits: list[tuple[int, _Split]]) -> None:
        self.splits = splits
        self.every: list[WorkerQueue] = []
        self.one: list[tuple[WorkerQueue, int]] = []
        self.some: list[tuple[WorkerQueue, frozenset[int]]] = []


class _Split:
    """One (source, event) of the router's cache: the queues that take it, those that
    skip it, and the frames skipped since the split was made (not yet added to each)."""

    __slots__ = ("_others", "skip", "skipped", "take")

    def __init__(self, take: tuple[WorkerQueue, ...], skip: tuple[WorkerQueue, ...]) -> None:
        self.take = take
        self.skip = skip
        self.skipped = 0
        #: publisher -> ``take`` without the publisher's queue (an ``others`` target)
        self._others: dict[int | None, tuple[WorkerQueue, ...]] = {}

    def others(self, publisher: int | None) -> tuple[WorkerQueue, ...]:
        found = self._others.get(publisher)
        if found is None:
            found = self._others[publisher] = tuple(q for q in self.take if q.worker_id != publisher)
        return found


def _by_id(queue: WorkerQueue) -> int:
    return queue.worker_id
