"""The client-side checks of ``serve``: every byte a client sends, against the contract.

Fatal problems (the ones a broker must close the connection for: a bad request, a bad
hello, an undecodable or mis-shaped publish) raise :class:`Fatal`; problems a broker would
not notice because it never decodes the inner event are returned as a list of strings.
"""

from __future__ import annotations

from typing import TypeGuard

import h11

from shared.tools.conformance.profiles import DecodeError, Profile, hexabbr
from shared.tools.conformance.wire import UPGRADE_REQUEST, UPGRADE_TOKEN

__all__ = ["Fatal", "Rejection", "check_hello", "check_inner", "check_publish", "judge_request",
           "request_deviation"]

_EVENT_KEYS = frozenset({"source", "event", "data", "wid"})


class Fatal(Exception):
    """A contract violation after which the connection is closed."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Rejection(Exception):
    """The upgrade request must be refused with this HTTP status."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


def request_deviation(head: bytes) -> str | None:
    """How ``head`` differs from the exact 87-byte upgrade request, or None."""
    if head == UPGRADE_REQUEST:
        return None
    at = next((i for i, (a, b) in enumerate(zip(head, UPGRADE_REQUEST, strict=False)) if a != b),
              min(len(head), len(UPGRADE_REQUEST)))
    return (f"upgrade request is not the exact {len(UPGRADE_REQUEST)}-byte request: first "
            f"difference at byte {at}: expected {UPGRADE_REQUEST[at:at + 20]!r}, "
            f"got {head[at:at + 20]!r} (request is {len(head)} bytes)")


def judge_request(head: bytes) -> None:
    """Accept a well-formed GET carrying the token (PROTOCOL.md §2.1), else raise Rejection."""
    conn = h11.Connection(h11.SERVER)
    try:
        conn.receive_data(head)
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        raise Rejection(400, "Bad Request", f"malformed HTTP request: {exc}") from exc
    if not isinstance(event, h11.Request):
        raise Rejection(400, "Bad Request", f"incomplete HTTP request head: {hexabbr(head)}")
    if event.method != b"GET":
        raise Rejection(405, "Method Not Allowed",
                        f"method {event.method.decode('latin-1')} is not GET")
    tokens = [t.strip().lower() for name, value in event.headers if name == b"upgrade"
              for t in value.decode("latin-1").split(",")]
    if UPGRADE_TOKEN.lower() not in tokens:
        raise Rejection(426, "Upgrade Required", f"no Upgrade: {UPGRADE_TOKEN} in the request")


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_text(value: object, profile: Profile) -> bool:
    # A Lua string is bytes; luabuf hands back str for valid UTF-8 and bytes otherwise.
    return isinstance(value, str) or (not profile.native and isinstance(value, bytes))


def _as_map(obj: object, what: str) -> dict[object, object]:
    if not isinstance(obj, dict):
        raise Fatal(what.split()[0], f"{what} is a {type(obj).__name__}, must be a map")
    return obj


#: Limits on a hello's capability list (docs/protocol.md §8).
MAX_CAPS = 32
MAX_CAP_LEN = 32


def check_hello(obj: object, native: bool = True) -> tuple[int, int, frozenset[str]]:
    """``{"id": int, "pid": int}`` and, native only, an optional ``"caps": [str]``; nothing
    else. Returns (id, pid, caps)."""
    hello = _as_map(obj, "hello")
    allowed = {"id", "pid", "caps"} if native else {"id", "pid"}
    if not {"id", "pid"} <= set(hello) <= allowed:
        raise Fatal("hello", f"hello keys are {sorted(map(str, hello))}, must be ['id', 'pid']"
                    + (" and optionally 'caps'" if native else ""))
    wid, pid = hello["id"], hello["pid"]
    if not (_is_int(wid) and _is_int(pid)):
        raise Fatal("hello", f"hello id={wid!r} pid={pid!r}, both must be integers")
    caps = hello.get("caps", [])
    if not isinstance(caps, list) or len(caps) > MAX_CAPS or not all(
            isinstance(c, str) and len(c.encode()) <= MAX_CAP_LEN for c in caps):
        raise Fatal("hello", f"hello caps {caps!r:.80} must be a list of at most {MAX_CAPS} "
                    f"strings of at most {MAX_CAP_LEN} bytes")
    return wid, pid, frozenset(caps)


def check_publish(obj: object, profile: Profile) -> tuple[dict[object, object], bytes]:
    """``{"spec": <map>, "data": <bin>}`` with one of the spec shapes; returns (spec, data)."""
    msg = _as_map(obj, "publish")
    if set(msg) != {"spec", "data"}:
        raise Fatal("publish", f"publish keys are {sorted(map(str, msg))}, must be "
                    "['data', 'spec']")
    spec = _as_map(msg["spec"], "publish spec")
    data = msg["data"]
    if isinstance(data, str) and not profile.native:
        data = data.encode()  # luabuf's str for a UTF-8 Lua string: the same bytes
    if not isinstance(data, bytes):
        kind = "str" if isinstance(data, str) else type(data).__name__
        raise Fatal("publish", f"publish data is a {kind}, must be "
                    f"{'msgpack bin' if profile.native else 'a string'}")
    shapes = [{}, {"unique"}] + ([{"worker"}, {"others"}] if profile.native else [])
    if set(spec) not in [set(s) for s in shapes]:
        raise Fatal("publish", f"spec {spec!r} is none of {{}}, {{unique}}"
                    + (", {worker}, {others}" if profile.native else " (kong profile)"))
    if "unique" in spec and not _is_text(spec["unique"], profile):
        raise Fatal("publish", f"spec unique={spec['unique']!r} must be a string")
    if "worker" in spec and not _is_int(spec["worker"]):
        raise Fatal("publish", f"spec worker={spec['worker']!r} must be an integer")
    if "others" in spec and spec["others"] is not True:
        raise Fatal("publish", f"spec others={spec['others']!r} must be true")
    return spec, data


def check_inner(data: bytes, profile: Profile, hello_id: int) -> list[str]:
    """Problems with the inner event; the relay forwards it regardless, as a broker would."""
    try:
        obj = profile.decode(data)
    except DecodeError as exc:
        return [f"inner event is undecodable ({exc})"]
    if not isinstance(obj, dict):
        return [f"inner event is a {type(obj).__name__}, must be a map"]
    problems = []
    unknown = set(obj) - _EVENT_KEYS
    if unknown:
        problems.append(f"inner event has unknown keys {sorted(map(str, unknown))}")
    missing = {"source", "event", "wid"} - set(obj)
    if missing:
        problems.append(f"inner event lacks {sorted(missing)}")
    problems.extend(f"inner event {key}={obj[key]!r} must be a string"
                    for key in ("source", "event") if key in obj and not _is_text(obj[key], profile))
    if "wid" in obj:
        wid = obj["wid"]
        if not _is_int(wid):
            problems.append(f"inner event wid={wid!r} must be an integer")
        elif wid != hello_id:
            problems.append(f"inner event wid={wid} differs from the hello id {hello_id}")
    return problems
