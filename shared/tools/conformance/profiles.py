"""The two wire profiles as the kit sees them: frame header width, size limit and codec.

The kit has its own framing on purpose: it is a black-box tester and must not share a single
line with the implementation it judges. The native codec is ``msgpack`` directly; the kong
codec (LuaJIT ``string.buffer``) comes from ``shared.luabuf``, imported only when the kong
profile is actually used, so the native profile works without it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

__all__ = ["KONG", "NATIVE", "PROFILES", "DecodeError", "Profile", "hexabbr"]

#: Payload limits: what the frame header can express (PROTOCOL.md §3).
NATIVE_MAX_PAYLOAD = 0xFFFF
KONG_MAX_PAYLOAD = 0xFFFFFF


def hexabbr(data: bytes, limit: int = 24) -> str:
    """Hex of ``data``, abbreviated in the middle when long, with the total length."""
    if len(data) <= limit:
        return f"{data.hex()} ({len(data)} bytes)"
    head, tail = data[: limit - 4], data[-4:]
    return f"{head.hex()}..{tail.hex()} ({len(data)} bytes)"


class DecodeError(Exception):
    """A payload is not exactly one object of the profile's codec."""


def _native_encode(obj: object) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def _native_decode(data: bytes) -> object:
    # unpackb rejects trailing bytes (ExtraData), which is what "one object, no trailing
    # bytes" in PROTOCOL.md §4 asks for; raw=False keeps str and bin apart.
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise DecodeError(f"msgpack {type(exc).__name__}: {exc}") from exc


def _luabuf() -> Any:
    # Lazy on purpose: the kit is a black box and loads none of the library; only the kong
    # profile borrows the library's LuaJIT string.buffer codec (a pure leaf), when used.
    return importlib.import_module("shared.luabuf")


def _kong_encode(obj: object) -> bytes:
    encoded: bytes = _luabuf().dumps(obj)
    return encoded


def _kong_decode(data: bytes) -> object:
    luabuf = _luabuf()
    bus_error = importlib.import_module("shared.errors").BusError
    try:
        return luabuf.loads(data)
    except bus_error as exc:  # luabuf raises only RemoteProtocolError for bad input
        raise DecodeError(f"string.buffer {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class Profile:
    """One wire profile (PROTOCOL.md: ``native`` or ``kong``)."""

    name: str
    header_len: int
    max_payload: int
    encode: Callable[[object], bytes]
    decode: Callable[[bytes], object]
    #: worker/others targets and the str/bin distinction exist in the native profile only.
    native: bool

    def frame(self, payload: bytes) -> bytes:
        """``payload`` with its length header; refuses lengths the header cannot carry."""
        if len(payload) > self.max_payload:
            raise ValueError(f"{len(payload)} bytes do not fit a {self.name} frame")
        return len(payload).to_bytes(self.header_len, "big") + payload

    def header(self, announced: int) -> bytes:
        """A bare length header, for deliberately lying about the payload size."""
        return announced.to_bytes(self.header_len, "big")


NATIVE = Profile("native", 2, NATIVE_MAX_PAYLOAD, _native_encode, _native_decode, True)
KONG = Profile("kong", 3, KONG_MAX_PAYLOAD, _kong_encode, _kong_decode, False)
PROFILES = {p.name: p for p in (NATIVE, KONG)}
