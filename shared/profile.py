"""Wire profiles: the two dialects of the one protocol (docs/protocol.md §1).

They differ only in the frame header width and the payload codec; the handshake, message
structure, routing and semantics are shared, so one broker core and one client core serve
both.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from .codec import Codec, MsgpackCodec

__all__ = ["NATIVE", "Profile", "get_profile"]


@dataclass(frozen=True)
class Profile:
    """One dialect: how frames are delimited and how payloads are encoded."""

    name: str
    #: Width of the big-endian length prefix of every frame.
    header_len: int
    codec: Codec
    #: Whether the ``worker`` and ``others`` targets exist (native extensions to Kong's set).
    extended_targets: bool
    #: Default for the client's ``max_payload_len``: lua-resty-events uses 64 KiB.
    default_max_payload_len: int
    #: Lua strings are byte strings that the Lua codec hands back as ``str`` when they are
    #: valid UTF-8; in this profile a ``str`` where bytes belong is re-encoded, not refused.
    text_is_bytes: bool = False

    @property
    def max_frame_len(self) -> int:
        """The largest payload the frame header can announce."""
        return (1 << (8 * self.header_len)) - 1


NATIVE = Profile(
    name="native",
    header_len=2,
    codec=MsgpackCodec(),
    extended_targets=True,
    default_max_payload_len=65535,
)


@cache
def _kong() -> Profile:
    # Imported on first use so the native profile works without the Lua codec loaded.
    from .luabuf import LuaBufferCodec

    return Profile(
        name="kong",
        header_len=3,
        codec=LuaBufferCodec(),
        extended_targets=False,
        default_max_payload_len=65536,
        text_is_bytes=True,
    )


def get_profile(name: str | Profile) -> Profile:
    """Return the profile called ``name`` (``"native"`` or ``"kong"``)."""
    if isinstance(name, Profile):
        return name
    if name == "native":
        return NATIVE
    if name == "kong":
        return _kong()
    raise ValueError(f"unknown profile {name!r}: expected 'native' or 'kong'")


def __getattr__(attr: str) -> Profile:
    # `KONG` is resolved lazily for the same reason as _kong().
    if attr == "KONG":
        return _kong()
    raise AttributeError(attr)
