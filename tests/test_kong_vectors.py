"""Decode LuaJIT-produced bytes: the project's own vectors and, when present, real captures.

``tests/vectors/kong/vectors.json`` ships with the repository (made by make_vectors.py next
to it; the value rendering is described in the README there). The captures of the real
lua-resty-events 0.3.1 under ``/work/shared/vectors/kong`` exist only on the machine that
recorded them; the tests that read them skip cleanly elsewhere.
"""

from __future__ import annotations

import ast
import json
import math
import pathlib
import re
from dataclasses import dataclass
from typing import Any

import pytest

from shared.errors import RemoteProtocolError
from shared.luabuf import NULL, loads

from .helpers import kong_captures

OWN = pathlib.Path(__file__).resolve().parent / "vectors" / "kong" / "vectors.json"
SHARED = kong_captures()
NOT_FRAMES = {
    "worker-upgrade-request.hex",
    "real-broker-101-response.hex",
    "real-broker-101-trailing.hex",
}  # HTTP bytes, not frames


@dataclass(frozen=True)
class Encoded:
    """Expected: a Lua string whose bytes decode to ``value`` (a publish's ``data``)."""

    value: object


def split_frames(stream: bytes) -> list[bytes]:
    """Split a kong-profile byte stream (3-byte big-endian length + payload) into payloads."""
    payloads = []
    while stream:
        assert len(stream) >= 3, "a partial frame header"
        size = int.from_bytes(stream[:3], "big")
        assert len(stream) >= 3 + size, "a partial frame"
        payloads.append(stream[3 : 3 + size])
        stream = stream[3 + size :]
    return payloads


def as_bytes(value: object) -> bytes:
    """A Lua string decodes as str when it is valid UTF-8; get its bytes either way."""
    if isinstance(value, str):
        return value.encode("utf-8")
    assert isinstance(value, bytes), f"expected a Lua string, got {value!r}"
    return value


# ------------------------------------------------------------------ the project's own vectors


def from_json(node: Any) -> object:
    """Turn the JSON rendering of vectors.json (see its README) into Python values."""
    if isinstance(node, list):
        return [from_json(item) for item in node]
    if not isinstance(node, dict):
        return node
    if len(node) == 1:
        ((tag, arg),) = node.items()
        if tag == "$null":
            return NULL
        if tag == "$bytes":
            return bytes.fromhex(arg)
        if tag == "$float":
            return float(arg)
        if tag == "$complex":
            return complex(*arg)
        if tag == "$rep":
            return arg[0] * arg[1]
        if tag == "$table":
            return {from_json(k): from_json(v) for k, v in arg}
        if tag == "$encoded":
            return Encoded(from_json(arg))
        assert not tag.startswith("$"), f"unknown rendering {tag}"
    return {k: from_json(v) for k, v in node.items()}


def same(actual: object, expected: object) -> bool:
    """Type-strict equality (ints stay ints, -0.0 keeps its sign), aware of Encoded."""
    if isinstance(expected, Encoded):
        return same(loads(as_bytes(actual)), expected.value)
    if type(actual) is not type(expected):
        return False
    if isinstance(expected, float):
        assert isinstance(actual, float)
        if math.isnan(expected):
            return math.isnan(actual)
        return actual == expected and math.copysign(1, actual) == math.copysign(1, expected)
    if isinstance(expected, list):
        assert isinstance(actual, list)
        return len(actual) == len(expected) and all(map(same, actual, expected))
    if isinstance(expected, dict):
        assert isinstance(actual, dict)
        if actual.keys() != expected.keys():
            return False
        keys = {k: k for k in actual}
        return all(same(keys[k], k) and same(actual[k], v) for k, v in expected.items())
    return actual == expected


def own_vectors() -> list[dict[str, Any]]:
    vectors: list[dict[str, Any]] = json.loads(OWN.read_text("utf-8"))["vectors"]
    return vectors


@pytest.mark.parametrize("vector", own_vectors(), ids=lambda v: str(v["name"]))
def test_own_vector(vector: dict[str, Any]) -> None:
    (payload,) = split_frames(bytes.fromhex(vector["hex"]))
    if "error" in vector:
        with pytest.raises(RemoteProtocolError):
            loads(payload)
        return
    actual = loads(payload)
    expected = from_json(vector["value"])
    assert same(actual, expected), f"{vector['lua']}: {actual!r} != {expected!r}"


def test_own_vectors_cover_the_24_capture_cases() -> None:
    names = {v["name"] for v in own_vectors()}
    assert {f"case{n:02d}" for n in range(1, 25)} <= names


# ------------------------------------------------------------------ the real captures

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is not here")


def shared_hex_files() -> list[str]:
    if not SHARED.is_dir():
        return ["(absent)"]  # one id, so the test is reported as skipped, not missing
    return sorted(p.name for p in SHARED.glob("*.hex") if p.name not in NOT_FRAMES)


def python_repr(text: str) -> object:
    """Read a Python repr from the captures; they spell ngx.null as a bare ``null``."""

    def convert(node: ast.expr) -> object:
        if isinstance(node, ast.Name) and node.id == "null":
            return NULL
        if isinstance(node, ast.Dict):
            return {
                convert(k): convert(v) for k, v in zip(node.keys, node.values, strict=True) if k
            }
        if isinstance(node, ast.List):
            return [convert(item) for item in node.elts]
        return ast.literal_eval(node)

    return convert(ast.parse(text.strip(), mode="eval").body)


def read_hex(name: str) -> tuple[list[str], bytes]:
    lines = (SHARED / name).read_text("utf-8").splitlines()
    comments = [line[1:].strip() for line in lines if line.startswith("#")]
    data = "".join(line.strip() for line in lines if not line.startswith("#"))
    return comments, bytes.fromhex(data)


def check_outer_inner(outer: object, comments: list[str]) -> None:
    """A publish: compare ``spec``, the inner length, and the inner event decoded again."""
    assert isinstance(outer, dict)
    inner = as_bytes(outer["data"])
    for line in comments:
        if line.startswith("outer = "):
            expected = python_repr(line.removeprefix("outer = "))
            assert isinstance(expected, dict)
            assert outer["spec"] == expected["spec"]
            assert expected["data"] == f"<{len(inner)} bytes>"
        if line.startswith("inner (data field decoded) = "):
            assert loads(inner) == python_repr(line.split(" = ", 1)[1])


@needs_shared
@pytest.mark.parametrize("name", shared_hex_files())
def test_shared_capture_frames(name: str) -> None:
    comments, stream = read_hex(name)
    payloads = split_frames(stream)
    assert payloads, "no frame in the capture"
    values = [loads(payload) for payload in payloads]  # every frame must decode
    for line in comments:
        if "payload decoded: " in line:
            assert values == [python_repr(line.split("payload decoded: ", 1)[1])]
        elif name == "worker-info-frame.hex":
            assert values == [python_repr(line.split(": ", 1)[1])]
            (info,) = values
            assert isinstance(info, dict) and all(type(v) is int for v in info.values())
        elif match := re.search(r"\{id=(-?\d+),pid=(\d+)\}", line):
            assert values == [{"id": int(match[1]), "pid": int(match[2])}]
        elif match := re.search(r"spec=\{unique='([^']*)'\}", line):
            assert isinstance(values[0], dict)
            assert values[0]["spec"] == {"unique": match[1]}
    if name.startswith("worker-publish") or "py-publish" in name:
        check_outer_inner(values[0], comments)


def summaries() -> list[str]:
    if not SHARED.is_dir():
        return ["(absent)"]
    return ["real-broker-summary.json", "real-broker-stream-summary.json"]


def load_summary(name: str) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads((SHARED / name).read_text("utf-8"))
    return summary


def lua_view(received: str) -> dict[str, object]:
    """What a real nginx worker got, as it logged it with cjson: compare like with like."""
    event: dict[str, object] = json.loads(received)
    del event["receiver"], event["dtype"]
    return event


def as_json(value: object) -> object:
    """Our decoded event as cjson would print it (NULL -> None, ints and floats alike)."""
    return json.loads(json.dumps(value, default=lambda v: None))


@needs_shared
@pytest.mark.parametrize("name", summaries())
def test_shared_summary_deliveries(name: str) -> None:
    summary = load_summary(name)
    assert len(summary["publish_all"]) == 24
    for case, entry in summary["publish_all"].items():
        data = loads(bytes.fromhex(entry["data_encoding_hex"]))
        for frame in entry["frames"]:
            payload = bytes.fromhex(frame["payload"])
            assert int(frame["len_hdr"], 16) == len(payload)
            event = loads(payload)
            assert event == python_repr(frame["decoded"]), f"case {case}"
            assert isinstance(event, dict)
            assert type(event["wid"]) is int  # 0.0 on the wire, an int for us
            assert event.get("data") == data  # the data alone, encoded by Lua, agrees
    for frame in summary["reconnect_frames"]:
        assert isinstance(loads(split_frames(bytes.fromhex(frame))[0]), dict)


@needs_shared
@pytest.mark.parametrize("name", summaries())
def test_shared_summary_python_publishes_as_lua_saw_them(name: str) -> None:
    summary = load_summary(name)
    for key in ("py_publish", "py_publish_unique", "py_publish_int_tag"):
        entry = summary[key]
        (outer,) = (loads(p) for p in split_frames(bytes.fromhex(entry["frame"])))
        assert isinstance(outer, dict)
        inner = as_bytes(outer["data"])
        event = loads(inner)
        for received in entry["nginx_received"]:
            assert lua_view(received) == as_json(event), key
        for echo in entry["echo_to_py"]:
            assert split_frames(bytes.fromhex(echo)) == [inner]  # forwarded unchanged
    assert loads(bytes.fromhex("06ffffffff")) == -1  # the int32 tag the int_tag case used


@needs_shared
def test_shared_python_broker_summary() -> None:
    summary = load_summary("py-broker-summary.json")
    for handshake in summary["handshakes"]:
        (info,) = (loads(p) for p in split_frames(bytes.fromhex(handshake["info_frame"])))
        assert info == handshake["info"]
    for key, entry in summary.items():
        if key.startswith("worker_publish_"):
            (sent,) = (entry["log"][0][2],)
            outer = loads(split_frames(bytes.fromhex(sent))[0])
            assert isinstance(outer, dict)
            inner = as_bytes(outer["data"])
            for direction, _worker, payload in entry["log"][1:]:
                assert direction == "broker->worker"
                assert bytes.fromhex(payload) == inner
            for received in entry["nginx_received"]:
                assert lua_view(received) == as_json(loads(inner))
        if key.startswith("py_injected"):
            event = loads(bytes.fromhex(entry["payload"]))
            for received in entry["nginx_received"]:
                assert lua_view(received) == as_json(event)
