"""Slow reference implementations that the library's fast paths are held to.

Written for clarity, not speed: the codec's plain ``loads``/``dumps`` and the schema of
docs/protocol.md §3, §4 and §8 checked key by key, with no byte-level shortcuts, no inlined
loops and no caches. tests/test_fast_paths.py compares every fast path against these on
generated inputs. They import only the codecs, the profiles, the errors and the value types
(Target, NodeWid) of the library, never the code under test.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from shared.errors import RemoteProtocolError
from shared.messages import ALL, OTHERS, ControlFrame, NodeWid, Target, TargetKind
from shared.profile import Profile

#: (source, event, data, wid), as handlers see an event
Fields = tuple[str, str, Any, "int | None"]


# --- frames (docs/protocol.md §3) --------------------------------------------------------


def frame(payload: bytes, header_len: int) -> bytes:
    """One frame: the payload's length, big-endian, in ``header_len`` bytes, then it."""
    assert len(payload) < 256**header_len
    return len(payload).to_bytes(header_len, "big") + payload


def parse_frames(stream: bytes, header_len: int, max_frame_len: int) -> tuple[list[bytes], str]:
    """Every whole frame of ``stream`` and what follows: ``"ok"`` (the stream ends on a
    frame boundary), ``"partial"`` (it ends inside a frame) or ``"too long"`` (a header
    announces more than ``max_frame_len``; nothing after it counts)."""
    payloads: list[bytes] = []
    pos = 0
    while pos < len(stream):
        if len(stream) - pos < header_len:
            return payloads, "partial"
        length = int.from_bytes(stream[pos : pos + header_len], "big")
        if length > max_frame_len:
            return payloads, "too long"
        if len(stream) - pos - header_len < length:
            return payloads, "partial"
        payloads.append(stream[pos + header_len : pos + header_len + length])
        pos += header_len + length
    return payloads, "ok"


# --- publish (§4) ------------------------------------------------------------------------


def _int(value: object) -> int:
    # Lua numbers are doubles: an integral float is an int; a bool never is.
    if isinstance(value, bool):
        raise RemoteProtocolError("a boolean is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise RemoteProtocolError(f"not an integer: {value!r}")


def publish_spec(profile: Profile, target: Target) -> dict[str, object]:
    """The ``spec`` map of a publish to ``target``."""
    kind = target.kind
    if kind is TargetKind.ALL:
        spec: dict[str, object] = {}
    elif kind is TargetKind.UNIQUE:
        spec = {"unique": target.key}
    elif kind is TargetKind.OTHERS and profile.extended_targets:
        spec = {"others": True}
    elif kind is TargetKind.WORKER and profile.extended_targets:
        spec = {"worker": target.worker_id}
    else:
        raise ValueError(f"no {target} in the {profile.name} profile")
    if target.cluster:
        if not profile.extended_targets:
            raise ValueError("no cluster scope")
        spec["scope"] = "cluster"
    return spec


def encode_publish(profile: Profile, target: Target, event_bytes: bytes) -> bytes:
    return profile.codec.dumps({"spec": publish_spec(profile, target), "data": event_bytes})


def decode_publish(profile: Profile, payload: bytes) -> tuple[Target, bytes]:
    """Raises: RemoteProtocolError for anything but a publish."""
    msg = profile.codec.loads(payload)
    if not isinstance(msg, dict) or set(msg) != {"spec", "data"}:
        raise RemoteProtocolError("a publish is a map of spec and data")
    spec, data = msg["spec"], msg["data"]
    if isinstance(data, str) and profile.text_is_bytes:
        data = data.encode("utf-8")
    if not isinstance(data, bytes) or not isinstance(spec, dict):
        raise RemoteProtocolError("publish data must be bytes and spec a map")
    cluster = False
    if profile.extended_targets and "scope" in spec:
        if spec["scope"] != "cluster":
            raise RemoteProtocolError("unknown scope")
        cluster = True
        spec = {k: v for k, v in spec.items() if k != "scope"}
    if spec == {}:
        target = ALL
    elif len(spec) != 1:
        raise RemoteProtocolError("a spec has one key")
    elif "unique" in spec and isinstance(spec["unique"], (str, bytes)) and spec["unique"]:
        key = spec["unique"]
        target = Target(TargetKind.UNIQUE, key=key.decode("utf-8", "replace") if isinstance(key, bytes) else key)
    elif "others" in spec and profile.extended_targets and spec["others"] is True:
        target = OTHERS
    elif "worker" in spec and profile.extended_targets:
        target = Target(TargetKind.WORKER, worker_id=_int(spec["worker"]))
    else:
        raise RemoteProtocolError("unknown spec")
    if cluster:
        if target.kind not in (TargetKind.ALL, TargetKind.OTHERS, TargetKind.UNIQUE):
            raise RemoteProtocolError("no cluster scope for this target")
        target = Target(target.kind, target.worker_id, target.key, cluster=True)
    return target, data


def decode_publish_batch(
    profile: Profile, payloads: list[bytes]
) -> tuple[list[tuple[Target, bytes]], bool]:
    """Each publish up to the first invalid one, as (target, its event framed), and whether
    an invalid one stopped the batch."""
    out: list[tuple[Target, bytes]] = []
    for payload in payloads:
        try:
            target, data = decode_publish(profile, payload)
        except RemoteProtocolError:
            return out, True
        out.append((target, frame(data, profile.header_len)))
    return out, False


# --- event (§4, §8) ----------------------------------------------------------------------


def encode_event(profile: Profile, source: str, event: str, data: object, wid: int | None) -> bytes:
    msg: dict[str, object] = {"source": source, "event": event}
    if data is not None:
        msg["data"] = data
    if wid is not None:
        msg["wid"] = wid
    return profile.codec.dumps(msg)


def decode_event(profile: Profile, payload: bytes) -> Fields:
    """Raises: ControlFrame for a pong; RemoteProtocolError for anything else not an event."""
    msg = profile.codec.loads(payload)
    if not isinstance(msg, dict):
        raise RemoteProtocolError("an event is a map")
    if "source" not in msg and set(msg) == {"pong"}:
        raise ControlFrame("pong", msg)
    source, event = msg.get("source"), msg.get("event")
    if not isinstance(source, str) or not isinstance(event, str):
        raise RemoteProtocolError("an event has string source and event")
    wid = msg.get("wid")
    if wid is not None:
        wid = _int(wid)
        if isinstance(msg.get("node"), str):
            wid = NodeWid(wid, msg["node"])
    return source, event, msg.get("data"), wid


# --- embed's sequence check (shared/sequence.py's module docstring) -----------------------


class SequenceCheck:
    """One embedded receiver's gap check, delivery by delivery.

    Every other publisher numbers its broadcasts (``sb``) and its events to one worker
    (``sw``); a number more than one past the last seen on that stream is a gap, reported
    as a ``lost`` notice right before the event that revealed it, unless ``dropped``
    notices of the broker already account for it. A ``sync`` marker carries the latest
    numbers sent (no +1). First sight, repeats and going backwards (a restart) set the
    baseline. Events from ourselves and from other nodes are not checked; a ``joined``
    with a new pid under a known worker id starts that worker's streams afresh.
    """

    def __init__(self, worker_id: int) -> None:
        self.worker_id = worker_id
        self.last: dict[str, dict[int, int]] = {"sb": {}, "sw": {}}
        self.pids: dict[int, int] = {}
        self.drops = 0
        self.lost = 0

    def deliver(self, profile: Profile, payload: bytes) -> list[Fields]:
        """The events handlers get for one delivery (notices first). Raises as decode_event."""
        fields = decode_event(profile, payload)
        msg = profile.codec.loads(payload)
        assert isinstance(msg, dict)
        source, event, data, wid = fields
        if wid is None:
            if source == "workerbus" and isinstance(data, dict):
                self._lifecycle(event, data)
            return [fields]
        if isinstance(wid, NodeWid) or wid == self.worker_id:
            return [fields]
        lost = 0
        for key in ("sb", "sw"):
            number = msg.get(key)
            if isinstance(number, int) and not isinstance(number, bool):
                lost += self._gap(key, wid, number, marker=False)
        if source == "workerbus" and event == "sync" and isinstance(data, dict):
            marked = data.get("sb")
            if isinstance(marked, int) and not isinstance(marked, bool):
                lost += self._gap("sb", wid, marked, marker=True)
            pairs = data.get("sw")
            for pair in pairs if isinstance(pairs, list) else []:
                if isinstance(pair, list) and len(pair) == 2 and pair[0] == self.worker_id:
                    if isinstance(pair[1], int):
                        lost += self._gap("sw", wid, pair[1], marker=True)
        if not lost:
            return [fields]
        return [("workerbus", "lost", {"count": lost, "wid": wid, "total": self.lost}, None), fields]

    def _gap(self, key: str, wid: int, number: int, marker: bool) -> int:
        previous = self.last[key].get(wid)
        self.last[key][wid] = number
        if previous is None or number <= previous:
            return 0
        gap = number - previous - (0 if marker else 1)
        if gap <= 0:
            return 0
        explained = min(gap, self.drops)
        self.drops -= explained
        self.lost += gap - explained
        return gap - explained

    def _lifecycle(self, event: str, data: dict[Any, Any]) -> None:
        def number(value: object) -> int | None:
            try:
                return None if value is None else _int(value)
            except RemoteProtocolError:
                return None

        if event == "dropped":
            count = number(data.get("count"))
            if count is not None and count > 0:
                self.drops += count
        elif event == "joined":
            wid, pid = number(data.get("worker_id")), number(data.get("pid"))
            if wid is not None and pid is not None:
                if wid in self.pids and self.pids[wid] != pid:
                    self.last["sb"].pop(wid, None)
                    self.last["sw"].pop(wid, None)
                self.pids[wid] = pid


# --- dispatch ------------------------------------------------------------------------------


async def dispatch(subscriptions: dict[tuple[str, str], dict[str, Any]], fields: Fields) -> int:
    """Run one event's handlers; return how many raised.

    ``subscriptions`` maps (source, event) patterns to {id: handler} in subscription order.
    The levels are (``*``, ``*``), (source, ``*``), (source, event), each run once even if
    a literal ``*`` makes two the same; a level's handlers are the ones subscribed when the
    level starts. A handler's exception is logged and counted, an awaitable result awaited.
    """
    source, event, data, wid = fields
    failed = 0
    seen = []
    for key in (("*", "*"), (source, "*"), (source, event)):
        if key in seen:
            continue
        seen.append(key)
        for handler in list(subscriptions.get(key, {}).values()):
            try:
                result = handler(data, event, source, wid)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                failed += 1
                logging.getLogger("shared.dispatch").exception("handler failed")
    return failed
