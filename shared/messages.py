"""The messages of the contract and their schemas (docs/protocol.md §4 and §8).

- hello, client → broker, first frame: ``{"id": int, "pid": int, "caps"?: [str]}``
- publish, client → broker: ``{"spec": {...}, "data": <bytes: an encoded event>}``
- event, encoded once by the publisher: ``{"source", "event", "data"?, "wid"}``
- delivery, broker → client: the publish's inner ``data`` bytes, unchanged.
- native extensions, negotiated by ``caps`` in the hello (§8): welcome (broker → client,
  first frame), ping (client → broker), pong (broker → client); with ``filter``: sub
  (client → broker, its pattern set) and the keyed publish (``src``/``ev`` beside
  ``spec``/``data``). Control frames from the broker are maps without a ``"source"`` key,
  so they can never be taken for an event.

Validation of what a peer sent raises :class:`RemoteProtocolError`; refusing to build a bad
message raises :class:`LocalProtocolError`. The codec comes from the profile, so the same
functions serve the native (MessagePack) and kong (LuaJIT) dialects. Lua numbers are doubles,
so integral floats are accepted wherever an int is expected.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from .codec import MsgpackCodec
from .errors import PayloadTooLarge, RemoteProtocolError
from .frame import encode_frame
from .nodewid import NodeWid
from .profile import NATIVE, Profile

__all__ = [
    "ALL",
    "CAP_BARRIER",
    "CAP_CLUSTER",
    "CAP_FILTER",
    "CAP_UNFRAMED",
    "CAP_WELCOME",
    "CURRENT",
    "MAX_CAPS",
    "MAX_CAP_LEN",
    "MAX_SUB_NAME_LEN",
    "MAX_SUB_PATTERNS",
    "OTHERS",
    "PROTOCOL_VERSION",
    "ControlFrame",
    "Event",
    "Hello",
    "NodeWid",
    "RunKeys",
    "Welcome",
    "Target",
    "TargetKind",
    "as_control_frame",
    "build_publish",
    "build_publish_frame",
    "decode_event",
    "decode_event_batch",
    "decode_event_fields",
    "decode_event_objects",
    "decode_hello",
    "decode_ping",
    "decode_pong",
    "decode_sub",
    "decode_welcome",
    "decode_publish",
    "decode_publish_batch",
    "usual_ping",
    "encode_event",
    "encode_hello",
    "encode_ping",
    "encode_pong",
    "encode_sub",
    "encode_welcome",
    "event_fields",
    "encode_publish",
    "encode_publish_keyed",
    "parse_target",
]


class TargetKind(enum.Enum):
    ALL = "all"  #: every worker, the publisher included
    CURRENT = "current"  #: this process only; never on the wire
    OTHERS = "others"  #: every worker but the publisher's id (native extension)
    WORKER = "worker"  #: one worker by id (native extension)
    UNIQUE = "unique"  #: exactly one worker, deduplicated by key within unique_timeout


@dataclass(frozen=True, slots=True)
class Target:
    """Where a publish goes. Build with :func:`parse_target` or the constants."""

    kind: TargetKind
    worker_id: int | None = None
    key: str | None = None
    #: scope "cluster": also for the workers of the other nodes (docs/cluster.md); only
    #: all, others and unique have a cluster scope. The default is host-local.
    cluster: bool = False

    def __str__(self) -> str:
        if self.kind is TargetKind.WORKER:
            return f"worker:{self.worker_id}"
        if self.kind is TargetKind.UNIQUE:
            return f"unique:{self.key}"
        return str(self.kind.value)

    def with_scope(self, scope: str) -> Target:
        """This target with scope ``"local"`` (the default) or ``"cluster"``.

        Raises:
            ValueError: an unknown scope, or a cluster scope for ``current`` or
                ``worker:N`` (worker ids are per node).
        """
        if scope == "local":
            return self if not self.cluster else Target(self.kind, self.worker_id, self.key)
        if scope != "cluster":
            raise ValueError(f"invalid scope {scope!r}: expected local or cluster")
        if self.kind not in (TargetKind.ALL, TargetKind.OTHERS, TargetKind.UNIQUE):
            raise ValueError(f"target {self} has no cluster scope (only all, others, unique:KEY)")
        return Target(self.kind, self.worker_id, self.key, cluster=True)

    @property
    def on_wire(self) -> bool:
        return self.kind is not TargetKind.CURRENT


ALL = Target(TargetKind.ALL)
CURRENT = Target(TargetKind.CURRENT)
OTHERS = Target(TargetKind.OTHERS)
#: parse_target runs once per publish: the named targets are looked up, not rebuilt.
_NAMED_TARGETS = {"all": ALL, "current": CURRENT, "others": OTHERS}


def parse_target(value: object) -> Target:
    """Accept ``"all"``, ``"current"``, ``"others"``, ``"worker:N"``, ``"unique:KEY"``,
    an int worker id, or a :class:`Target`. (Typed ``object``: anything else is refused
    with ValueError, also when this module runs compiled, which checks annotations.)

    Raises:
        ValueError: anything else.
    """
    if isinstance(value, Target):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return Target(TargetKind.WORKER, worker_id=value)
    if not isinstance(value, str):
        raise ValueError(f"invalid target {value!r}")
    named = _NAMED_TARGETS.get(value)
    if named is not None:
        return named
    kind, sep, arg = value.partition(":")
    if sep and kind == "unique" and arg:
        return Target(TargetKind.UNIQUE, key=arg)
    if sep and kind == "worker":
        try:
            return Target(TargetKind.WORKER, worker_id=int(arg))
        except ValueError:
            pass
    raise ValueError(
        f"invalid target {value!r}: expected all, current, others, worker:N or unique:KEY"
    )


@dataclass(frozen=True, slots=True)
class Hello:
    worker_id: int
    pid: int
    #: capabilities the client asked for; empty for a plain (old-style) hello
    caps: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Welcome:
    """The broker's answer to a hello that asked for ``"welcome"`` (docs/protocol.md §8)."""

    version: int
    broker: str
    profile: str
    #: the worker id the broker registered this connection under
    worker_id: int
    #: the asked capabilities this broker grants
    caps: frozenset[str]
    #: the largest publish payload the broker accepts: the client must respect it
    max_payload_len: int
    max_queue_len: int
    unique_timeout: float


class ControlFrame(RemoteProtocolError):
    """A broker control frame (a map without ``"source"``, e.g. a pong) met by an event
    decoder. Not an event: the client's read loop handles it. Code that does not know about
    control frames sees an undecodable delivery, which is what it was before them."""

    def __init__(self, kind: str, message: dict[Any, Any]) -> None:
        super().__init__(f"a {kind} control frame is not an event")
        self.kind = kind
        self.message = message


def _node_wid(msg: dict[Any, Any], wid: int | None) -> int | None:
    # Events from another node carry "node" (added by the bridge that delivered them).
    node = msg.get("node")
    if type(node) is str and wid is not None:
        return NodeWid(wid, node)
    return wid


@dataclass(frozen=True, slots=True)
class Event:
    """One event as handlers see it. ``wid`` is None for ``current`` events.

    ``node`` is the node it came from when another node of a cluster published it, else
    None (docs/cluster.md).
    """

    source: str
    event: str
    data: Any
    wid: int | None
    node: str | None = None


def _as_int(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise RemoteProtocolError(f"{what} must be an integer, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise RemoteProtocolError(f"{what} must be an integer, got {type(value).__name__}")


def _as_map(obj: object, what: str) -> dict[Any, Any]:
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"{what} must be a map, got {type(obj).__name__}")
    return obj


def _as_bytes(profile: Profile, value: object, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    # A Lua string that happens to be valid UTF-8 comes back from the Lua codec as str;
    # re-encoding it is lossless. In the native profile data must be msgpack bin.
    if isinstance(value, str) and profile.text_is_bytes:
        return value.encode("utf-8")
    raise RemoteProtocolError(f"{what} must be bytes, got {type(value).__name__}")


# --- hello -------------------------------------------------------------------------------

#: Version of the negotiated extensions, sent in the welcome.
PROTOCOL_VERSION = 1
#: The broker answers the hello with a welcome frame before anything else.
CAP_WELCOME = "welcome"
#: The client may send ping frames; the broker answers each with a pong.
CAP_BARRIER = "barrier"
#: The client may publish with ``"scope": "cluster"`` (docs/cluster.md); a broker accepts
#: the scope only from clients it granted this.
CAP_CLUSTER = "cluster"
#: Limits on the hello's capability list: more names, or a longer name, is a protocol error
#: (a hello is read before anything is known of the peer; it must stay small).
MAX_CAPS = 32
MAX_CAP_LEN = 32
#: The client may send ``sub`` frames (its handlers' (source, event) patterns) and its
#: publishes carry ``src``/``ev``; the broker then sends it only the events it handles.
CAP_FILTER = "filter"
#: Limits on a ``sub`` frame: patterns in one set, and bytes in one source or event name.
#: Checked before anything is kept; over them is a protocol error (docs/protocol.md §8).
MAX_SUB_PATTERNS = 1024
MAX_SUB_NAME_LEN = 256
#: The broker writes this client's deliveries (and its pongs) as bare MessagePack objects
#: back to back, without frame headers (native only; docs/protocol.md §8).
CAP_UNFRAMED = "unframed"


def encode_hello(
    profile: Profile, worker_id: int, pid: int, caps: tuple[str, ...] | None = None
) -> bytes:
    """A hello; ``caps`` only in the native profile (a plain hello when None or empty)."""
    if not caps:
        return profile.codec.dumps({"id": worker_id, "pid": pid})
    if not profile.extended_targets:
        raise ValueError(f"capabilities do not exist in the {profile.name} profile")
    return profile.codec.dumps({"id": worker_id, "pid": pid, "caps": list(caps)})


def decode_hello(profile: Profile, payload: bytes) -> Hello:
    """Raises: RemoteProtocolError if the payload is not a valid hello."""
    msg = _as_map(profile.codec.loads(payload), "hello")
    if "id" not in msg or "pid" not in msg:
        raise RemoteProtocolError(f"hello needs 'id' and 'pid', got keys {sorted(map(str, msg))}")
    hello = Hello(_as_int(msg["id"], "hello id"), _as_int(msg["pid"], "hello pid"))
    if "caps" not in msg or not profile.extended_targets:
        return hello  # (the kong profile has no capabilities: the key is ignored, as before)
    return Hello(hello.worker_id, hello.pid, _decode_caps(msg["caps"], "hello caps"))


def _decode_caps(value: object, what: str) -> frozenset[str]:
    if not isinstance(value, list):
        raise RemoteProtocolError(f"{what} must be a list of strings, got {type(value).__name__}")
    if len(value) > MAX_CAPS:
        raise RemoteProtocolError(f"{what} lists {len(value)} names, over the limit of {MAX_CAPS}")
    for name in value:
        if not isinstance(name, str):
            raise RemoteProtocolError(f"{what} must be strings, got {type(name).__name__}")
        if len(name.encode("utf-8")) > MAX_CAP_LEN:
            raise RemoteProtocolError(
                f"{what}: a name of {len(name.encode('utf-8'))} bytes, over the limit of "
                f"{MAX_CAP_LEN}"
            )
    return frozenset(value)


# --- welcome, ping, pong (native extensions, negotiated) --------------------------------


def encode_welcome(profile: Profile, welcome: Welcome) -> bytes:
    # "welcome" first: a control frame is told by its first key (docs/protocol.md §8).
    return profile.codec.dumps(
        {
            "welcome": welcome.version,
            "broker": welcome.broker,
            "profile": welcome.profile,
            "id": welcome.worker_id,
            "caps": sorted(welcome.caps),
            "max_payload_len": welcome.max_payload_len,
            "max_queue_len": welcome.max_queue_len,
            "unique_timeout": welcome.unique_timeout,
        }
    )


def decode_welcome(profile: Profile, payload: bytes) -> Welcome:
    """Raises: RemoteProtocolError if the payload is not a valid welcome."""
    msg = _as_map(profile.codec.loads(payload), "welcome")
    if "welcome" not in msg or "source" in msg:
        raise RemoteProtocolError(f"not a welcome: keys {sorted(map(str, msg))[:8]}")
    try:
        broker, prof = msg["broker"], msg["profile"]
        timeout = msg["unique_timeout"]
        welcome = Welcome(
            version=_as_int(msg["welcome"], "welcome version"),
            broker=broker if isinstance(broker, str) else "",
            profile=prof if isinstance(prof, str) else "",
            worker_id=_as_int(msg["id"], "welcome id"),
            caps=_decode_caps(msg["caps"], "welcome caps"),
            max_payload_len=_as_int(msg["max_payload_len"], "welcome max_payload_len"),
            max_queue_len=_as_int(msg["max_queue_len"], "welcome max_queue_len"),
            unique_timeout=float(timeout) if isinstance(timeout, (int, float)) else -1.0,
        )
    except KeyError as exc:
        raise RemoteProtocolError(f"welcome is missing {exc.args[0]!r}") from None
    if not isinstance(broker, str) or not isinstance(prof, str):
        raise RemoteProtocolError("welcome 'broker' and 'profile' must be strings")
    if isinstance(timeout, bool) or welcome.unique_timeout < 0:
        raise RemoteProtocolError(f"welcome unique_timeout must be a number >= 0, got {timeout!r}")
    if welcome.max_payload_len < 1 or welcome.max_queue_len < 1:
        raise RemoteProtocolError("welcome max_payload_len and max_queue_len must be >= 1")
    return welcome


def encode_ping(profile: Profile, n: int) -> bytes:
    return profile.codec.dumps({"ping": n})


def encode_pong(profile: Profile, n: int) -> bytes:
    return profile.codec.dumps({"pong": n})


def _decode_counter(profile: Profile, payload: bytes, key: str) -> int:
    msg = _as_map(profile.codec.loads(payload), key)
    if len(msg) != 1 or key not in msg:
        raise RemoteProtocolError(f"a {key} is {{{key!r}: n}}, got keys {sorted(map(str, msg))[:8]}")
    return _as_int(msg[key], f"{key} n")


def decode_ping(profile: Profile, payload: bytes) -> int:
    """The ``n`` of a ping. Raises: RemoteProtocolError if it is not one."""
    return _decode_counter(profile, payload, "ping")


_PING_HEAD = b"\x81\xa4ping"
#: msgpack's unsigned integer tags and their widths (a positive fixint has none).
_UINT_WIDTHS = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}


def usual_ping(profile: Profile, payload: bytes | bytearray) -> int:
    """The ``n`` of a native ping exactly as :func:`encode_ping` makes it (n >= 0), known
    by its bytes; -1 for anything else, which the general decoders then judge.

    A publisher's flush ends about every read it sends with a ping (the barrier): told
    apart here, it does not take the publish decoder's error path."""
    if profile is not NATIVE or type(payload) is not bytes or not payload.startswith(_PING_HEAD):
        return -1
    size = len(payload)
    if size < 7:
        return -1
    tag = payload[6]
    if size == 7:
        return tag if tag < 0x80 else -1
    if size == 7 + _UINT_WIDTHS.get(tag, -7):
        return int.from_bytes(payload[7:], "big")
    return -1


def decode_pong(profile: Profile, payload: bytes) -> int:
    """The ``n`` of a pong. Raises: RemoteProtocolError if it is not one."""
    return _decode_counter(profile, payload, "pong")


#: A set of (source, event) patterns as the broker keeps it for one connection.
SubPatterns = frozenset[tuple[str, str]]


def encode_sub(profile: Profile, patterns: SubPatterns) -> bytes:
    """A ``sub`` frame: the client's whole current pattern set (sorted: one set, one byte
    string). Raises: ValueError over the limits, so a client never sends one the broker
    would close the connection for."""
    if len(patterns) > MAX_SUB_PATTERNS:
        raise ValueError(f"{len(patterns)} subscription patterns, over the limit of {MAX_SUB_PATTERNS}")
    for source, event in patterns:
        if len(source.encode("utf-8")) > MAX_SUB_NAME_LEN or len(event.encode("utf-8")) > MAX_SUB_NAME_LEN:
            raise ValueError(f"a subscription name is over the limit of {MAX_SUB_NAME_LEN} bytes")
    return profile.codec.dumps({"sub": [list(p) for p in sorted(patterns)]})


def decode_sub(profile: Profile, payload: bytes) -> SubPatterns:
    """The pattern set of a ``sub`` frame.

    Raises:
        RemoteProtocolError: not a sub, the wrong shape (each pattern a list of two
        non-empty strings, ``"*"`` as the source only with ``"*"`` as the event), or over
        :data:`MAX_SUB_PATTERNS` / :data:`MAX_SUB_NAME_LEN`.
    """
    msg = _as_map(profile.codec.loads(payload), "sub")
    if len(msg) != 1 or "sub" not in msg:
        raise RemoteProtocolError(f"not a sub: keys {sorted(map(str, msg))[:8]}")
    value = msg["sub"]
    if not isinstance(value, list):
        raise RemoteProtocolError(f"sub must be a list of [source, event], got {type(value).__name__}")
    if len(value) > MAX_SUB_PATTERNS:
        raise RemoteProtocolError(f"sub lists {len(value)} patterns, over the limit of {MAX_SUB_PATTERNS}")
    patterns: set[tuple[str, str]] = set()
    for item in value:
        if not (isinstance(item, list) and len(item) == 2 and all(type(x) is str and x for x in item)):
            raise RemoteProtocolError(f"a sub pattern must be [source, event] (non-empty strings), got {item!r:.80}")
        source, event = item
        if len(source.encode("utf-8")) > MAX_SUB_NAME_LEN or len(event.encode("utf-8")) > MAX_SUB_NAME_LEN:
            raise RemoteProtocolError(f"a sub pattern name is over the limit of {MAX_SUB_NAME_LEN} bytes")
        if source == "*" and event != "*":
            raise RemoteProtocolError(f"sub pattern ['*', {event!r:.40}] never matches: use ['*', '*']")
        patterns.add((source, event))
    return frozenset(patterns)


# --- publish -----------------------------------------------------------------------------


# A native publish to all or others is built by concatenation: the bytes MessagePack makes
# of {"spec": {...}, "data": <bin>} (it keeps map order), without packing two maps per
# publish. decode_publish_batch recognises the same bytes without unpacking them.
_MSGPACK_ALL_HEAD = b"\x82\xa4spec\x80\xa4data"
_MSGPACK_OTHERS_HEAD = b"\x82\xa4spec\x81\xa6others\xc3\xa4data"


# The whole head for the usual event of under 256 bytes, per length: one concatenation.
_MSGPACK_ALL_HEADS = tuple(_MSGPACK_ALL_HEAD + bytes((0xC4, n)) for n in range(0x100))
_MSGPACK_OTHERS_HEADS = tuple(_MSGPACK_OTHERS_HEAD + bytes((0xC4, n)) for n in range(0x100))
# The same, framed (native header): what build_publish_frame puts before the event bytes,
# i.e. the frame of a publish of an n-byte event, up to where the event begins.
_FRAMED_ALL_HEADS = tuple(encode_frame(h + bytes(n))[: 2 + len(h)] for n, h in enumerate(_MSGPACK_ALL_HEADS))
_FRAMED_OTHERS_HEADS = tuple(encode_frame(h + bytes(n))[: 2 + len(h)] for n, h in enumerate(_MSGPACK_OTHERS_HEADS))


def _publish_head(profile: Profile, target: Target, size: int) -> bytes | None:
    """The bytes before an event of ``size`` bytes in a native publish to all or others
    (the publish's only encoder of these two targets), or None for anything else."""
    # (identity tests, not a dict lookup: hashing an Enum member runs Python code)
    if profile is not NATIVE or target.cluster:
        return None
    kind = target.kind
    if kind is TargetKind.ALL:
        if size < 0x100:
            return _MSGPACK_ALL_HEADS[size]
        head = _MSGPACK_ALL_HEAD
    elif kind is TargetKind.OTHERS:
        if size < 0x100:
            return _MSGPACK_OTHERS_HEADS[size]
        head = _MSGPACK_OTHERS_HEAD
    else:
        return None
    if size < 0x10000:
        return head + b"\xc5" + size.to_bytes(2, "big")
    if size < 1 << 32:
        return head + b"\xc6" + size.to_bytes(4, "big")
    return None


def encode_publish(profile: Profile, target: Target, event_bytes: bytes) -> bytes:
    """The outer publish message around an already encoded event."""
    head = _publish_head(profile, target, len(event_bytes))
    if head is not None:
        return head + event_bytes
    kind = target.kind
    spec: dict[str, object]
    if kind is TargetKind.ALL:
        spec = {}
    elif kind is TargetKind.UNIQUE:
        spec = {"unique": target.key}
    elif kind is TargetKind.WORKER and profile.extended_targets:
        spec = {"worker": target.worker_id}
    elif kind is TargetKind.OTHERS and profile.extended_targets:
        spec = {"others": True}
    else:
        raise ValueError(f"target {target} does not exist in the {profile.name} profile")
    if target.cluster:
        if not profile.extended_targets:
            raise ValueError(f"the {profile.name} profile has no cluster scope")
        spec["scope"] = "cluster"
    return profile.codec.dumps({"spec": spec, "data": event_bytes})


def encode_publish_keyed(profile: Profile, target: Target, event_bytes: bytes, source: str, event: str) -> bytes:
    """:func:`encode_publish` plus the event's ``src``/``ev`` (a client granted
    ``filter``): ``{"spec", "data", "src", "ev"}`` in that order, so the broker routes it
    by pattern without decoding the event."""
    head = _publish_head(profile, target, len(event_bytes))
    if head is not None:
        return b"\x84" + head[1:] + event_bytes + _KEY_SRC + _msgpack_str(source) + _KEY_EV + _msgpack_str(event)
    plain = _as_map(profile.codec.loads(encode_publish(profile, target, event_bytes)), "publish")
    plain["src"], plain["ev"] = source, event
    return profile.codec.dumps(plain)


def _msgpack_str(text: str) -> bytes:
    raw = text.encode("utf-8")
    n = len(raw)
    if n < 32:
        return bytes((0xA0 | n,)) + raw
    if n < 0x100:
        return b"\xd9" + bytes((n,)) + raw
    if n < 0x10000:
        return b"\xda" + n.to_bytes(2, "big") + raw
    return b"\xdb" + n.to_bytes(4, "big") + raw


_KEY_SRC = b"\xa3src"
_KEY_EV = b"\xa2ev"
# A keyed publish's head (a 4-entry map) for an event of under 256 bytes, per length.
_KEYED_ALL_HEADS = tuple(b"\x84" + head[1:] for head in _MSGPACK_ALL_HEADS)
_KEYED_OTHERS_HEADS = tuple(b"\x84" + head[1:] for head in _MSGPACK_OTHERS_HEADS)
#: A keyed publish's tail, and the framed heads (frame header + map head) of its events
#: of under 256 bytes, per length, to all and to others.
_KeyedParts = tuple[bytes, tuple[bytes, ...], tuple[bytes, ...]]
#: (source, event) -> its _KeyedParts. Names come from this process's own code; still
#: bounded: when full it is simply emptied.
_KEYED_PARTS: dict[tuple[str, str], _KeyedParts] = {}
_MAX_KEYED_PARTS = 1024
#: tail length -> the framed heads for it (shared by every pair whose tail is that long)
_FRAMED_KEYED_HEADS: dict[int, tuple[tuple[bytes, ...], tuple[bytes, ...]]] = {}


def _keyed_parts(source: str, event: str) -> _KeyedParts | None:
    # None (and nothing kept) when such a publish would not fit a native frame.
    tail = _KEY_SRC + _msgpack_str(source) + _KEY_EV + _msgpack_str(event)
    extra = len(tail)
    if len(_KEYED_OTHERS_HEADS[0xFF]) + 0xFF + extra >= 0x10000:
        return None
    heads = _FRAMED_KEYED_HEADS.get(extra)
    if heads is None:
        all_heads, others_heads = (
            tuple((len(h) + n + extra).to_bytes(2, "big") + h for n, h in enumerate(table))
            for table in (_KEYED_ALL_HEADS, _KEYED_OTHERS_HEADS)
        )
        heads = _FRAMED_KEYED_HEADS[extra] = (all_heads, others_heads)
    if len(_KEYED_PARTS) >= _MAX_KEYED_PARTS:
        _KEYED_PARTS.clear()
    parts = _KEYED_PARTS[(source, event)] = (tail, *heads)
    return parts


def _read_str(payload: bytes, pos: int) -> tuple[str, int] | None:
    # A fixstr or str8 at pos: (text, end), or None (not one of those, or cut short).
    size = len(payload)
    if pos >= size:
        return None
    tag = payload[pos]
    if 0xA0 <= tag <= 0xBF:
        start, n = pos + 1, tag & 0x1F
    elif tag == 0xD9 and pos + 1 < size:
        start, n = pos + 2, payload[pos + 1]
    else:
        return None
    end = start + n
    if end > size:
        return None
    try:
        return bytes(payload[start:end]).decode("utf-8"), end
    except UnicodeDecodeError:
        return None


def _read_key_tail(tail: bytes) -> tuple[str, str] | None:
    # What follows a keyed publish's data: "src" and a non-empty str, "ev" and a non-empty
    # str, and nothing more; their (source, event), or None (the general decoder decides).
    if tail[:4] != _KEY_SRC:
        return None
    src = _read_str(tail, 4)
    if src is None or tail[src[1] : src[1] + 3] != _KEY_EV:
        return None
    ev = _read_str(tail, src[1] + 3)
    if ev is None or ev[1] != len(tail) or not src[0] or not ev[0]:
        return None
    return src[0], ev[0]


def decode_publish(profile: Profile, payload: bytes) -> tuple[Target, bytes]:
    """Return the target and the inner event bytes (never decoded here).

    The general decoder, with a reason for every refusal; the broker's per-publish loop,
    :func:`decode_publish_batch`, recognises the usual publish by its bytes first.

    Raises:
        RemoteProtocolError: not a valid publish message.
    """
    target, data, _ = _decode_publish(profile, payload, keyed=False)
    return target, data


def _decode_publish(profile: Profile, payload: bytes | bytearray, *, keyed: bool) -> tuple[Target, bytes, tuple[str, str] | None]:
    # decode_publish; with ``keyed`` (a connection granted "filter") also the optional
    # src/ev pair, both or neither. (A transport may hand over a bytearray: a codec
    # takes bytes.)
    msg = _as_map(profile.codec.loads(payload if type(payload) is bytes else bytes(payload)), "publish")
    try:
        spec = _as_map(msg["spec"], "publish spec")
        data = _as_bytes(profile, msg["data"], "publish data")
    except KeyError as exc:
        raise RemoteProtocolError(f"publish is missing {exc.args[0]!r}") from None
    key: tuple[str, str] | None = None
    if keyed and len(msg) == 4 and "src" in msg and "ev" in msg:
        src, ev = msg["src"], msg["ev"]
        if type(src) is not str or type(ev) is not str or not src or not ev:
            raise RemoteProtocolError("publish src and ev must be non-empty strings")
        key = (src, ev)
    elif len(msg) != 2:
        extra = sorted(str(k) for k in msg if k not in ("spec", "data"))
        raise RemoteProtocolError(f"publish has unknown keys {extra}")
    return _decode_spec(profile, spec), data, key


@dataclass(slots=True)
class RunKeys:
    """The ``(source, event)`` of every publish of one run, from a connection granted
    ``filter`` (see :func:`decode_publish_batch`): ``names`` are the distinct pairs in the
    order they first appear (None for a publish without them), ``index`` gives each
    frame's position in ``names``. A pair per frame would cost a Python step per frame
    wherever it is used; this way the router works per distinct pair."""

    names: list[tuple[str, str] | None]
    index: list[int]

    def key_of(self, frame: int) -> tuple[str, str] | None:
        """The pair of the run's ``frame``-th publish."""
        return self.names[self.index[frame]]


def _run_keys(names: list[tuple[str, str] | None], index: list[int]) -> RunKeys | None:
    return None if len(names) == 1 and names[0] is None else RunKeys(names, index)


def decode_publish_batch(
    profile: Profile,
    payloads: Sequence[bytes | bytearray],
    keys: list[RunKeys | None] | None = None,
) -> tuple[list[tuple[Target, list[bytes]]], RemoteProtocolError | None]:
    """The broker's read path: every publish of one read, made into delivery frames.

    Returns runs of consecutive publishes with the same target, each run as the framed
    inner events (``header + event bytes``, ready to queue), and the error of the first
    invalid publish, if any: the broker routes what came before it, then closes the
    connection. Each publish is what :func:`decode_publish` makes of it.

    ``keys``, given for a connection granted ``filter`` (docs/protocol.md §8): publishes
    may then carry ``src``/``ev``, and one entry per run is appended to ``keys``: None
    when no publish of the run carried them (routed to every worker, as without the
    extension), else the run's :class:`RunKeys`. A change of ``src``/``ev`` does not end
    a run (a publisher that cycles through sources would make a run of every publish).

    This loop is the one recogniser of the usual publish: a native publish to all or
    others exactly as :func:`encode_publish` (or :func:`encode_publish_keyed`) makes it
    (either length encoding a native frame can hold; src/ev as fixstr or str8) is known by
    its bytes, without unpacking; anything else (another target, key order or length
    encoding, a length that does not match, a bytearray) goes through the general decoder,
    which accepts or rejects it with a reason. It is written out here, not called, because
    it runs once per publish.
    """
    runs: list[tuple[Target, list[bytes]]] = []
    run: list[bytes] = []
    run_target: Target | None = None
    error: RemoteProtocolError | None = None
    keyed = keys is not None
    header_len = profile.header_len
    native = profile is NATIVE
    all_head, others_head = _MSGPACK_ALL_HEAD, _MSGPACK_OTHERS_HEAD
    all_pos, others_pos = len(all_head), len(others_head)
    kall_head, kothers_head = b"\x84" + all_head[1:], b"\x84" + others_head[1:]
    # With keys, per run: the distinct pairs, each frame's position among them, each pair's
    # position, and each src/ev tail's (a tail repeats from publish to publish: it is
    # parsed once per run, then known by one dict look-up).
    names: list[tuple[str, str] | None] = []
    index: list[int] = []
    known: dict[tuple[str, str] | None, int] = {}
    tails: dict[bytes, int] = {}
    # The usual publish of a run after its first (a bin8 event, to the run's target; with
    # keys, with a tail already seen in the run) is known by its head and its length (or
    # its tail) alone: the shortcut below, the rest of the loop for everything else.
    # ``hot``: that head for the current run (up to the bin8 tag), or empty.
    hot_all = (kall_head if keyed else all_head) + b"\xc4" if native else b""
    hot_others = (kothers_head if keyed else others_head) + b"\xc4" if native else b""
    hot = b""
    hot_len = 0
    for payload in payloads:
        if hot and type(payload) is bytes and payload[:hot_len] == hot:
            size = len(payload)
            if size > hot_len:
                end = payload[hot_len] + hot_len + 1
                if keyed:
                    kid = tails.get(payload[end:], -1)  # (cut short: an empty tail, never kept)
                    if kid >= 0:
                        run.append(b"\x00" + payload[hot_len:end])
                        index.append(kid)
                        continue
                elif end == size:
                    run.append(b"\x00" + payload[hot_len:])
                    continue
        target: Target | None = None
        kid = -1  # the publish's position in ``names``, when already known
        key: tuple[str, str] | None = None
        tail = b""  # a keyed publish's src/ev tail not yet in ``tails``
        if native and type(payload) is bytes:
            four = False
            if keyed and payload.startswith(kall_head):
                target, pos, four = ALL, all_pos, True
            elif keyed and payload.startswith(kothers_head):
                target, pos, four = OTHERS, others_pos, True
            elif payload.startswith(all_head):
                target, pos = ALL, all_pos
            elif payload.startswith(others_head):
                target, pos = OTHERS, others_pos
            if target is not None:
                size = len(payload)
                tag = payload[pos] if size > pos + 1 else 0
                if tag == 0xC4:
                    end = payload[pos + 1] + pos + 2
                elif tag == 0xC5 and size > pos + 2:
                    end = ((payload[pos + 1] << 8) | payload[pos + 2]) + pos + 3
                else:
                    end = -1
                if not four:
                    if end != size:
                        target = None
                elif 0 < end <= size:
                    found = payload[end:]
                    kid = tails.get(found, -1)
                    if kid < 0:
                        key = _read_key_tail(found)
                        if key is None:
                            target = None
                        else:
                            tail = found
                else:
                    target = None
                if target is not None:
                    # The delivery frame: the event behind a 2-byte length, which the
                    # bin header holds already (bin16: its length; bin8: a 0 before it).
                    frame = b"\x00" + payload[pos + 1 : end] if tag == 0xC4 else payload[pos + 1 : end]
        if target is None:
            try:
                target, data, key = _decode_publish(profile, payload, keyed=keyed)
            except RemoteProtocolError as exc:
                error = exc
                break
            # (the event came inside a frame of this header width, so it fits one)
            frame = encode_frame(data, header_len)
        if target is not run_target:
            if keys is not None and run_target is not None:
                if kid >= 0:  # (a position in the run that ends here)
                    key, kid = names[kid], -1
                keys.append(_run_keys(names, index))
                names, index, known, tails = [], [], {}, {}
            run = []
            runs.append((target, run))
            run_target = target
            hot = hot_all if target is ALL else hot_others if target is OTHERS else b""
            hot_len = len(hot)
        if keyed:
            if kid < 0:
                kid = known.get(key, -1)
                if kid < 0:
                    kid = known[key] = len(names)
                    names.append(key)
                if tail:
                    tails[tail] = kid
            index.append(kid)
        run.append(frame)
    if keys is not None and run_target is not None:
        keys.append(_run_keys(names, index))
    return runs, error


def _decode_spec(profile: Profile, spec: dict[Any, Any]) -> Target:
    if "scope" in spec and profile.extended_targets:
        # The cluster scope (docs/cluster.md): the same spec plus "scope": "cluster".
        rest = {k: v for k, v in spec.items() if k != "scope"}
        if spec["scope"] == "cluster":
            target = _decode_spec(profile, rest)
            if target.kind in (TargetKind.ALL, TargetKind.OTHERS, TargetKind.UNIQUE):
                return Target(target.kind, target.worker_id, target.key, cluster=True)
        raise RemoteProtocolError(f"invalid publish spec {spec!r}")
    if not spec:
        return ALL
    if len(spec) == 1:
        ((key, value),) = spec.items()
        if key == "unique":
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            if isinstance(value, str) and value:
                return Target(TargetKind.UNIQUE, key=value)
        elif key == "worker" and profile.extended_targets:
            return Target(TargetKind.WORKER, worker_id=_as_int(value, "spec worker"))
        elif key == "others" and profile.extended_targets and value is True:
            return OTHERS
    raise RemoteProtocolError(f"invalid publish spec {spec!r}")


def build_publish(
    profile: Profile,
    wid: int,
    source: object,
    event: object,
    data: object,
    target: Target,
    max_payload_len: int,
) -> tuple[bytes, bytes]:
    """Validate and encode one publish; returns ``(event_bytes, publish_bytes)``.

    Everything a publisher must refuse *before* anything is sent is checked here, so the
    real client and the in-process test bus refuse exactly the same things.

    Raises:
        ValueError: ``source``/``event`` empty or not strings (typed ``object``: so also
            when this module runs compiled, which checks annotations), or a target the
            profile does not have.
        LocalProtocolError: ``data`` cannot be encoded by the profile's codec.
        PayloadTooLarge: the encoded publish exceeds ``max_payload_len``.
    """
    if not isinstance(source, str) or not source or not isinstance(event, str) or not event:
        raise ValueError("source and event must be non-empty strings")
    inner = encode_event(profile, source, event, data, wid)
    outer = encode_publish(profile, target, inner)
    if len(outer) > max_payload_len:
        raise PayloadTooLarge(len(outer), max_payload_len)
    return inner, outer


def build_publish_frame(
    profile: Profile,
    wid: int,
    source: object,
    event: object,
    data: object,
    target: Target,
    max_payload_len: int,
    keyed: bool = False,
) -> bytes:
    """:func:`build_publish`, framed: the bytes a client writes for one publish.

    ``keyed`` (a client granted ``filter``): the publish also carries ``src``/``ev``
    (:func:`encode_publish_keyed`).

    Same checks and errors, and the same bytes: this runs for every publish, and each
    layer of calls costs about as much as the checks, so the usual case (a native publish
    to all or others) is :func:`encode_event` and :func:`encode_publish` fused here, made
    of their parts (test_fast_paths holds it to the reference encoder).
    """
    if (
        (target is ALL or target is OTHERS)
        and profile is NATIVE
        and type(source) is str
        and type(event) is str
        and source
        and event
    ):
        # encode_event's usual case (the client always has an int wid)
        if data is None:
            inner = profile.codec.dumps({"source": source, "event": event, "wid": wid})
        else:
            inner = profile.codec.dumps({"source": source, "event": event, "data": data, "wid": wid})
        size = len(inner)
        if size < 0x100:
            if not keyed:
                # _publish_head's, with the frame header in front: encode_frame of the publish
                head = _FRAMED_ALL_HEADS[size] if target is ALL else _FRAMED_OTHERS_HEADS[size]
                length = len(head) - 2 + size
                if length > max_payload_len:
                    raise PayloadTooLarge(length, max_payload_len)
                return head + inner
            # encode_publish_keyed's bytes, framed; the src/ev tail and the framed heads
            # are the same for every publish of one (source, event), so they are made
            # once. (Over the limit: the careful path below says by how much.)
            parts = _KEYED_PARTS.get((source, event)) or _keyed_parts(source, event)
            if parts is not None:
                tail, all_heads, others_heads = parts
                head = all_heads[size] if target is ALL else others_heads[size]
                if len(head) - 2 + size + len(tail) <= max_payload_len:
                    return b"".join((head, inner, tail))
    return _careful_publish_frame(profile, wid, source, event, data, target, max_payload_len, keyed)


#: What :func:`publish_encoder` makes: ``(source, event, data, target) -> frame``.
PublishEncoder = Callable[[str, str, object, Target], bytes]


def publish_encoder(profile: Profile, wid: int, max_payload_len: int, keyed: bool = False) -> PublishEncoder:
    """:func:`build_publish_frame` with ``profile``, ``wid``, ``max_payload_len`` and
    ``keyed`` fixed: the same bytes and errors, for a publisher's per-event path.

    Once a publish of a (source, event) to all or others went through, the encoder keeps
    the bytes around its data: the frame heads per length, the event map up to ``data``,
    ``wid`` and (keyed) the ``src``/``ev`` tail. A later publish of it packs only its
    data and joins. Packed alone, data sits one level higher than in the event's map,
    which matters only at msgpack's nesting limit (511 levels): a value that deep packs
    to far more than the 255 bytes this path takes; anything longer, or over the limit,
    goes through :func:`build_publish_frame` (which says why it is refused).
    """
    codec = profile.codec
    if profile is not NATIVE or not isinstance(codec, MsgpackCodec) or type(wid) is not int or not -(2**63) <= wid < 2**64:

        def careful(source: object, event: object, data: object, target: Target) -> bytes:
            return build_publish_frame(profile, wid, source, event, data, target, max_payload_len, keyed)

        return careful

    new_pack = codec.new_pack
    # This encoder's own packer (the codec's pool costs as much as packing a small
    # value): taken out while in use, so a publish made while packing (a dict subclass's
    # items()) or from another thread finds none and goes the long way.
    spare = [new_pack()]
    every, others = ALL, OTHERS
    wid_tail = b"\xa3wid" + codec.dumps(wid)
    # (source, event) -> (map head up to data, bytes after data, their length,
    #   framed heads to all and to others per event length, and the longest event that
    #   fits the limit and a one-byte length, to all and to others)
    known: dict[tuple[str, str], tuple[bytes, bytes, int, tuple[bytes, ...], tuple[bytes, ...], int, int]] = {}
    unfit: set[tuple[str, str]] = set()

    def never(source: str, event: str) -> None:
        # Publishes of these names go straight to build_publish_frame (no packing first).
        if len(unfit) >= _MAX_KEYED_PARTS:
            unfit.clear()
        unfit.add((source, event))

    def remember(source: str, event: str) -> None:
        # After a publish of these names went through: both are encodable.
        around = b"\x84\xa6source" + _msgpack_str(source) + b"\xa5event" + _msgpack_str(event) + b"\xa4data"
        fixed = len(around) + len(wid_tail)
        if not keyed:
            suffix, all_heads, others_heads, extra = wid_tail, _FRAMED_ALL_HEADS, _FRAMED_OTHERS_HEADS, 0
        else:
            parts = _KEYED_PARTS.get((source, event)) or _keyed_parts(source, event)
            if parts is None:  # names too long for the short path
                never(source, event)
                return
            tail, all_heads, others_heads = parts
            suffix, extra = wid_tail + tail, len(tail)
        room_all = min(0xFF, max_payload_len - (len(all_heads[0]) - 2) - extra)
        room_others = min(0xFF, max_payload_len - (len(others_heads[0]) - 2) - extra)
        if max(room_all, room_others) <= fixed:  # no data fits (long names, a tiny limit)
            never(source, event)
            return
        if len(known) >= _MAX_KEYED_PARTS:
            known.clear()
        known[(source, event)] = (around, suffix, fixed, all_heads, others_heads, room_all, room_others)

    def encode(source: object, event: object, data: object, target: Target) -> bytes:
        if (target is others or target is every) and type(source) is str and type(event) is str:
            entry = known.get((source, event))
            if entry is not None and data is not None:
                try:
                    pack = spare.pop()
                except IndexError:
                    return build_publish_frame(profile, wid, source, event, data, target, max_payload_len, keyed)
                try:
                    packed = pack(data)
                except (TypeError, ValueError, OverflowError):
                    # Refused: the codec says why. (This packer may hold half a value.)
                    spare.append(new_pack())
                    return _careful_publish_frame(profile, wid, source, event, data, target, max_payload_len, keyed)
                except BaseException:
                    spare.append(new_pack())
                    raise
                spare.append(pack)
                around, suffix, fixed, all_heads, others_heads, room_all, room_others = entry
                size = fixed + len(packed)
                if target is others:
                    if size <= room_others:
                        return b"".join((others_heads[size], around, packed, suffix))
                elif size <= room_all:
                    return b"".join((all_heads[size], around, packed, suffix))
                # (long, or too large: build_publish_frame's own short path could not take it either)
                return _careful_publish_frame(profile, wid, source, event, data, target, max_payload_len, keyed)
            frame = build_publish_frame(profile, wid, source, event, data, target, max_payload_len, keyed)
            if entry is None and data is not None and (source, event) not in unfit:
                remember(source, event)
            return frame
        return build_publish_frame(profile, wid, source, event, data, target, max_payload_len, keyed)

    return encode


def _careful_publish_frame(
    profile: Profile,
    wid: int,
    source: object,
    event: object,
    data: object,
    target: Target,
    max_payload_len: int,
    keyed: bool,
) -> bytes:
    # build_publish_frame beyond its fast paths: build_publish's checks and errors.
    if keyed:
        inner, _ = build_publish(profile, wid, source, event, data, target, max_payload_len)
        # (build_publish took only non-empty strings)
        outer = encode_publish_keyed(profile, target, inner, cast(str, source), cast(str, event))
        if len(outer) > max_payload_len:
            raise PayloadTooLarge(len(outer), max_payload_len)
        return encode_frame(outer, profile.header_len)
    _, outer = build_publish(profile, wid, source, event, data, target, max_payload_len)
    return encode_frame(outer, profile.header_len)


# --- event -------------------------------------------------------------------------------


def encode_event(
    profile: Profile, source: str, event: str, data: object, wid: int | None
) -> bytes:
    """Encode the inner event once; the broker forwards these bytes unchanged.

    ``wid`` is None only for events the bus itself generates (no worker published them).

    Raises:
        LocalProtocolError: ``data`` cannot be encoded by the profile's codec.
    """
    msg: dict[str, object]
    if data is not None and wid is not None:
        msg = {"source": source, "event": event, "data": data, "wid": wid}  # the usual case
    else:
        msg = {"source": source, "event": event}
        if data is not None:
            msg["data"] = data
        if wid is not None:
            msg["wid"] = wid
    return profile.codec.dumps(msg)


def as_control_frame(msg: dict[Any, Any]) -> ControlFrame | None:
    """The :class:`ControlFrame` a decoded delivery is, if it is one (a pong: the only
    control frame after the welcome); for decoders of events, on their error path."""
    if "source" not in msg and len(msg) == 1 and "pong" in msg:
        return ControlFrame("pong", msg)
    return None


def decode_event(profile: Profile, payload: bytes) -> Event:
    """Raises: RemoteProtocolError if the payload is not a valid event."""
    source, event, data, wid = decode_event_fields(profile, payload)
    return Event(source, event, data, wid, getattr(wid, "node", None))


def decode_event_batch(
    profile: Profile, payloads: list[bytes]
) -> tuple[list[tuple[str, str, Any, int | None]], list[RemoteProtocolError]]:
    """:func:`decode_event_fields` for every delivery of one read.

    Returns the valid events in order, and one error per invalid payload (skipped). This
    loop runs once per delivery in every client: one call per event besides the codec's.
    """
    out: list[tuple[str, str, Any, int | None]] = []
    errors: list[RemoteProtocolError] = []
    append = out.append
    loads = profile.codec.loads
    for payload in payloads:
        try:
            append(event_fields(loads(payload)))
        except RemoteProtocolError as exc:
            errors.append(exc)
    return out, errors


def decode_event_objects(
    objects: list[object],
) -> tuple[list[tuple[str, str, Any, int | None]], list[RemoteProtocolError]]:
    """:func:`decode_event_batch` for deliveries already unpacked (``unframed``: the
    connection's Unpacker made the objects). The usual event is taken inline, on exact
    types; anything else goes through :func:`event_fields` (tests/test_fast_paths.py holds
    this loop to it).
    """
    out: list[tuple[str, str, Any, int | None]] = []
    errors: list[RemoteProtocolError] = []
    append = out.append
    for msg in objects:
        if type(msg) is dict:
            source = msg.get("source")
            event = msg.get("event")
            wid = msg.get("wid")
            if (
                type(source) is str
                and type(event) is str
                and (wid is None or type(wid) is int)
                and "node" not in msg
            ):
                append((source, event, msg.get("data"), wid))
                continue
        try:
            append(event_fields(msg))
        except RemoteProtocolError as exc:
            errors.append(exc)
    return out, errors


def decode_event_fields(profile: Profile, payload: bytes) -> tuple[str, str, Any, int | None]:
    """:func:`decode_event` as a plain ``(source, event, data, wid)`` tuple.

    The client's receive path uses this: it runs once per delivery, and building a frozen
    dataclass costs about as much as decoding the payload.

    Raises:
        RemoteProtocolError: not a valid event.
    """
    return event_fields(profile.codec.loads(payload))


def event_fields(msg: object) -> tuple[str, str, Any, int | None]:
    """The one event decoder, from what the codec made of a delivery (for decoders that
    also read other keys of the map, as embed's numbered events): the usual event is taken
    on exact types; anything else (a bool or float wid, a control frame, garbage) is
    checked with a reason.

    Raises:
        ControlFrame: a pong. RemoteProtocolError: anything else that is not an event.
    """
    if type(msg) is dict:
        source = msg.get("source")
        event = msg.get("event")
        wid = msg.get("wid")
        if type(source) is str and type(event) is str and (wid is None or type(wid) is int):
            if "node" in msg:
                wid = _node_wid(msg, wid)
            return source, event, msg.get("data"), wid
    msg = _as_map(msg, "event")
    source = msg.get("source")
    event = msg.get("event")
    control = as_control_frame(msg)
    if control is not None:
        raise control
    if not isinstance(source, str) or not isinstance(event, str):
        raise RemoteProtocolError("event needs string 'source' and 'event'")
    wid = msg.get("wid")
    return source, event, msg.get("data"), _node_wid(msg, None if wid is None else _as_int(wid, "wid"))
