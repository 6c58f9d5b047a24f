"""Payload codecs: turning one message object into bytes and back.

A codec is anything with ``dumps(obj) -> bytes`` and ``loads(bytes) -> object``. The native
profile uses MessagePack (this module is the only one that imports msgpack); the kong profile
uses LuaJIT ``string.buffer`` serialization (``shared.luabuf``).

Error contract: ``dumps`` raises only :class:`LocalProtocolError`, ``loads`` raises only
:class:`RemoteProtocolError`. Foreign exceptions are translated here and nowhere else.
"""

from __future__ import annotations

from typing import Any, Protocol

import msgpack

from .errors import LocalProtocolError, RemoteProtocolError

__all__ = ["Codec", "MsgpackCodec"]


class Codec(Protocol):
    """What the message layer needs from a payload codec."""

    name: str

    def dumps(self, obj: object) -> bytes: ...

    def loads(self, data: bytes) -> object: ...


def _refuse_ext(code: int, data: bytes) -> object:
    # The contract defines no extension types; accepting them would let a peer smuggle
    # values that other clients cannot decode.
    raise ValueError(f"msgpack extension type {code} is not part of the contract")


class MsgpackCodec:
    """MessagePack with the contract's fixed options.

    ``str`` travels as msgpack str, ``bytes`` as bin (``use_bin_type``); map keys must be
    strings (``strict_map_key``), which also rules out unhashable keys.
    """

    name = "msgpack"

    def __init__(self) -> None:
        # msgpack.packb() builds a Packer for every call, which costs about as much as
        # packing a small event. Packers are reused from this pool instead: a Packer has a
        # buffer, so each is taken out while in use; another thread (or a re-entrant call
        # from a dict subclass's items()) finds the pool empty and gets a new one. The pool
        # never holds more packers than were ever in use at once.
        self._packers: list[Any] = []

    def dumps(self, obj: object) -> bytes:
        pool = self._packers
        try:
            packer = pool.pop()
        except IndexError:
            packer = msgpack.Packer(use_bin_type=True)
        try:
            out: bytes = packer.pack(obj)
        except (TypeError, ValueError, OverflowError) as exc:
            # (the packer is not put back: it may hold half a message)
            raise LocalProtocolError(f"cannot encode as MessagePack: {exc}") from exc
        pool.append(packer)
        return out

    def loads(self, data: bytes) -> object:
        try:
            return msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_refuse_ext)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise RemoteProtocolError(f"undecodable MessagePack payload: {exc}") from exc
