"""Payload codecs: turning one message object into bytes and back.

A codec is anything with ``dumps(obj) -> bytes`` and ``loads(bytes) -> object``. The native
profile uses MessagePack (this module is the only one that imports msgpack); the kong profile
uses LuaJIT ``string.buffer`` serialization (``shared.luabuf``).

Error contract: ``dumps`` raises only :class:`LocalProtocolError`, ``loads`` raises only
:class:`RemoteProtocolError`. Foreign exceptions are translated here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import msgpack

from .errors import LocalProtocolError, RemoteProtocolError

__all__ = ["Codec", "MsgpackCodec", "MsgpackStreamDecoder"]


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

    def new_pack(self) -> Callable[[object], bytes]:
        """A fresh packer's ``pack``, with :meth:`dumps`'s options but not its pool or its
        errors: for a caller on a per-event path that keeps it to itself (it holds a
        buffer: one use at a time) and calls :meth:`dumps` instead when it is in use or
        raised (TypeError, ValueError, OverflowError: then dumps says why)."""
        pack: Callable[[object], bytes] = msgpack.Packer(use_bin_type=True).pack
        return pack

    def loads(self, data: bytes) -> object:
        try:
            return msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_refuse_ext)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise RemoteProtocolError(f"undecodable MessagePack payload: {exc}") from exc


class MsgpackStreamDecoder:
    """Sans-IO reader of MessagePack objects written back to back, no frames (the
    ``unframed`` deliveries of docs/protocol.md §8): one ``msgpack.Unpacker`` per
    connection, iterated in C, with the options of :meth:`MsgpackCodec.loads`.

    ``max_len`` is the largest object accepted (the frame payload limit). The Unpacker
    resumes an incomplete object where the bytes ran out (it keeps what it decoded of it,
    not its bytes), so its own buffer limit does not bound an object: each read is fed in
    pieces of at most ``max_len // 4`` bytes, and once more than ``max_len`` + one piece
    arrived since the last piece that completed an object, no object of ``max_len`` bytes
    can be under way: the stream is refused. So objects up to ``max_len`` always pass, an
    incomplete one is refused before more than 1.25x the limit of it was decoded, and
    none over 1.5x ever passes (between the limit and that, one may: the price of not
    asking the Unpacker where each object ends). After an error the decoder is latched,
    as :class:`~shared.frame.FrameDecoder`.
    """

    __slots__ = ("_error", "_max", "_piece", "_since", "_unpacker")

    def __init__(self, max_len: int) -> None:
        if max_len < 1:
            raise ValueError("max_len must be at least 1")
        self._max = max_len
        self._piece = max(1, max_len // 4)
        # A str or bin is buffered whole before it is decoded: room for one of max_len
        # (and its header) plus the piece that completes it.
        self._unpacker = msgpack.Unpacker(
            raw=False,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            max_buffer_size=max_len + self._piece + 16,
            max_str_len=max_len,
            max_bin_len=max_len,
            max_array_len=max_len,
            max_map_len=max_len,
            max_ext_len=max_len,
        )
        #: Bytes fed since (and including) the last piece that completed an object: an
        #: upper bound of the incomplete object's size.
        self._since = 0
        self._error: str | None = None

    @property
    def failed(self) -> bool:
        """True once the stream is known to be broken; every later call raises."""
        return self._error is not None

    @property
    def piece_size(self) -> int:
        """The most bytes fed to the Unpacker at once (``max_len // 4``)."""
        return self._piece

    def feed(self, data: bytes) -> list[object]:
        """Add ``data``; return every object it completed, in order.

        The objects before a bad one are returned; the error is raised by the next call.

        Raises:
            RemoteProtocolError: undecodable bytes, or an object over ``max_len``.
        """
        if self._error is not None:
            raise RemoteProtocolError(self._error)
        out: list[object] = []
        size = len(data)
        if not size:
            return out
        piece = self._piece
        if size <= piece:
            self._take(data, out)
        else:
            with memoryview(data) as view:
                for start in range(0, size, piece):
                    self._take(view[start : start + piece], out)
                    if self._error is not None:
                        break
        if self._error is not None and not out:
            raise RemoteProtocolError(self._error)
        return out

    def _take(self, piece: Any, out: list[object]) -> None:
        count = len(out)
        try:
            self._unpacker.feed(piece)
            out.extend(self._unpacker)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            self._error = f"undecodable MessagePack delivery: {str(exc) or type(exc).__name__}"
            return
        if len(out) > count:
            self._since = len(piece)
        else:
            self._since += len(piece)
            if self._since > self._max + self._piece:
                self._error = f"a delivery over the limit of {self._max} bytes"

    def eof(self) -> None:
        """The stream ended. Raises if it ended inside an object.

        Raises:
            RemoteProtocolError: an object was incomplete.
        """
        if self._error is not None:
            raise RemoteProtocolError(self._error)
        # Whether an object is under way is not visible from outside the Unpacker: a nil
        # (one byte, a whole object) comes back as itself only if none is.
        try:
            self._unpacker.feed(b"\xc0")
            tail = list(self._unpacker)
        except (ValueError, TypeError, msgpack.UnpackException):
            tail = []
        if tail != [None]:
            self._error = "stream ended inside a delivery"
            raise RemoteProtocolError(self._error)
