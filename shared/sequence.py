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

:class:`SequenceOut` and :class:`SequenceIn` are pure bookkeeping; :class:`Sequencer` puts
them on the wire: it numbers publishes and checks deliveries through the client's public
seam (:class:`shared.client.ClientHooks`), composed by :mod:`shared.embed`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .dispatch import Fields
from .errors import PayloadTooLarge, RemoteProtocolError
from .frame import encode_frame
from .logutil import LogLimiter
from .messages import NodeWid, Target, TargetKind, as_control_frame, encode_publish

if TYPE_CHECKING:
    from .client import Client

__all__ = ["BROADCAST_KEY", "LIFECYCLE_SOURCE", "WORKER_KEY", "SequenceIn", "SequenceOut", "Sequencer"]

logger = logging.getLogger(__name__)

#: The bus's own events (the broker's ``LIFECYCLE_SOURCE``): never numbered.
LIFECYCLE_SOURCE = "workerbus"

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


def as_int(value: object) -> int | None:
    """An integer from the wire (msgpack may carry 3.0 for 3), else None; never a bool."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


#: Called for each of the broker's lifecycle events met while a read is decoded:
#: ``(event, data, out)``; notices appended to ``out`` reach handlers in order, right before
#: that event.
LifecycleObserver = Callable[[str, dict[Any, Any], list[Fields]], None]


class Sequencer:
    """One embedded client's numbering of its publishes and checks of everybody else's.

    Its :meth:`encode_publish`, :meth:`decode_batch` and :meth:`decode_objects` have the signatures of the
    :class:`~shared.client.ClientHooks` methods of the same names. ``on_lifecycle`` sees the
    broker's lifecycle events other than those this class uses itself (it still sees
    ``dropped`` and ``joined``).
    """

    def __init__(self, worker_id: int, on_lifecycle: LifecycleObserver | None = None) -> None:
        self.worker_id = worker_id
        self.out = SequenceOut()
        self.seen = SequenceIn(worker_id)
        self._on_lifecycle = on_lifecycle
        self._log = LogLimiter(logger)

    @property
    def lost(self) -> int:
        """Events found missing through gaps (not counting drops the broker reported)."""
        return self.seen.lost

    def marks(self) -> dict[str, object]:
        """The data of the ``sync`` marker sent after every (re)connect."""
        return self.out.marks()

    # --- numbered publishes --------------------------------------------------------------

    def encode_publish(
        self, client: Client, source: str, event: str, data: object, target: Target
    ) -> bytes:
        numbered = None if source == LIFECYCLE_SOURCE else self.out.assign(target)
        try:
            if not isinstance(source, str) or not source or not isinstance(event, str) or not event:
                raise ValueError("source and event must be non-empty strings")
            msg: dict[str, object] = {"source": source, "event": event}
            if data is not None:
                msg["data"] = data
            msg["wid"] = client.worker_id
            if numbered is not None:
                msg[numbered[0]] = numbered[1]
            profile = client.profile
            outer = encode_publish(profile, target, profile.codec.dumps(msg))
            if len(outer) > client.max_payload_len:
                raise PayloadTooLarge(len(outer), client.max_payload_len)
        except BaseException:
            # Refused: take the number back, so refusals leave no gaps. (Once encoded, the
            # client buffers the frame at once: ClientHooks.encode_publish.)
            self.out.rollback()
            raise
        self.out.commit()
        return encode_frame(outer, profile.header_len)

    # --- checked deliveries --------------------------------------------------------------

    def decode_batch(
        self, client: Client, payloads: list[bytes]
    ) -> tuple[list[Fields], list[RemoteProtocolError]]:
        # Framed deliveries (a broker that did not grant "unframed"): unpacked here, then
        # checked as objects. An undecodable one stays in its place as its error (raised
        # by _check in order), so errors keep the order of the deliveries.
        loads = client.profile.codec.loads
        objects: list[object] = []
        for payload in payloads:
            try:
                objects.append(loads(payload))
            except RemoteProtocolError as exc:
                objects.append(exc)
        return self._checked(objects)

    def decode_objects(
        self, client: Client, objects: list[object]
    ) -> tuple[list[Fields], list[RemoteProtocolError]]:
        # Deliveries the connection's Unpacker made ("unframed", docs/protocol.md §8).
        return self._checked(objects)

    def _checked(self, objects: list[object]) -> tuple[list[Fields], list[RemoteProtocolError]]:
        # One loop over the read, in order, so that a "lost" notice lands right before the
        # event that revealed the gap. The common delivery (a plain event from a numbered
        # publisher whose number is the next expected one, or from ourselves) is checked
        # inline: that is exactly the case where SequenceIn._step finds no gap, and it
        # costs a dict get and set. Anything else goes through _check, the careful path
        # (tests/test_fast_paths.py holds this loop to it).
        out: list[Fields] = []
        errors: list[RemoteProtocolError] = []
        append = out.append
        me = self.worker_id
        broadcast = self.seen._broadcast
        per_worker = self.seen._worker
        check = self._check
        for msg in objects:
            try:
                if type(msg) is dict and "node" not in msg:
                    source = msg.get("source")
                    event = msg.get("event")
                    wid = msg.get("wid")
                    if (
                        type(source) is str
                        and type(event) is str
                        and type(wid) is int
                        and source != LIFECYCLE_SOURCE
                    ):
                        sb = msg.get(BROADCAST_KEY)
                        sw = msg.get(WORKER_KEY)
                        if wid == me or (sb is None and sw is None):
                            # own streams are never checked; unique events carry no number
                            append((source, event, msg.get("data"), wid))
                            continue
                        if sw is None:
                            if type(sb) is int and broadcast.get(wid) == sb - 1:
                                broadcast[wid] = sb
                                append((source, event, msg.get("data"), wid))
                                continue
                        elif sb is None and type(sw) is int and per_worker.get(wid) == sw - 1:
                            per_worker[wid] = sw
                            append((source, event, msg.get("data"), wid))
                            continue
                fields = check(msg, out)
            except RemoteProtocolError as exc:
                errors.append(exc)
                continue
            append(fields)
        return out, errors

    def _check(self, msg: object, out: list[Fields]) -> Fields:
        if not isinstance(msg, dict):
            if isinstance(msg, RemoteProtocolError):
                raise msg  # (a framed delivery that did not decode: decode_batch)
            raise RemoteProtocolError(f"event must be a map, got {type(msg).__name__}")
        source = msg.get("source")
        event = msg.get("event")
        if not isinstance(source, str) or not isinstance(event, str):
            control = as_control_frame(msg)  # (a pong: the client's read loop takes it)
            if control is not None:
                raise control
            raise RemoteProtocolError("event needs string 'source' and 'event'")
        raw_wid = msg.get("wid")
        wid = as_int(raw_wid)
        if raw_wid is not None and wid is None:
            raise RemoteProtocolError("wid must be an integer")
        data = msg.get("data")
        node = msg.get("node")
        if isinstance(node, str) and wid is not None:
            # From another node (docs/cluster.md): its numbers are not ours to check.
            return source, event, data, NodeWid(wid, node)
        if wid is not None:
            lost = 0
            for key in (BROADCAST_KEY, WORKER_KEY):
                number = msg.get(key)
                if isinstance(number, int) and not isinstance(number, bool):
                    lost += self.seen.event(wid, key, number)
            if source == LIFECYCLE_SOURCE and event == "sync":
                lost += self.seen.sync(wid, data)
            if lost:
                self._report_lost(lost, wid, out)
        elif source == LIFECYCLE_SOURCE and isinstance(data, dict):
            self._lifecycle(event, data, out)
        return source, event, data, wid

    def _report_lost(self, count: int, wid: int, out: list[Fields]) -> None:
        self._log.log(
            logging.WARNING,
            "worker %d: %d events from worker %d never arrived (lost with a broker)",
            self.worker_id,
            count,
            wid,
        )
        out.append((LIFECYCLE_SOURCE, "lost", {"count": count, "wid": wid, "total": self.seen.lost}, None))

    def _lifecycle(self, event: str, data: dict[Any, Any], out: list[Fields]) -> None:
        if event == "dropped":
            count = as_int(data.get("count"))
            if count:
                self.seen.dropped(count)
        elif event == "joined":
            wid, pid = as_int(data.get("worker_id")), as_int(data.get("pid"))
            if wid is not None and pid is not None:
                self.seen.joined(wid, pid)
        if self._on_lifecycle is not None:
            self._on_lifecycle(event, data, out)
