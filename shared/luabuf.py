"""The ``kong`` profile payload codec: LuaJIT ``string.buffer`` serialization in pure Python.

This module turns one Python value into the bytes LuaJIT's ``buf:encode()`` writes, and
such bytes back into a value. It knows nothing of frames or messages. The byte format and
the reasons for each choice are in ``docs/kong-codec.md``.

Mapping, Lua (tag) -> Python when decoding; encoding is the reverse unless stated:

- nil (00) -> ``None``; false/true (01/02) -> ``bool``; ``ngx.null`` (03) -> :data:`NULL`.
- double (07) -> ``int`` when integral, within +-2**53 and not -0.0 (x86-64 LuaJIT writes
  every number as a double, so ``wid=0`` arrives as 0.0); otherwise ``float``.
  int32 (06, from ARM64 peers), int64/uint64 cdata (10/11) -> ``int``; complex (12) ->
  ``complex``; lightuserdata (04/05) -> ``int`` (its address; never encoded).
  Encoding: ``int`` within +-2**53 and ``float`` -> double; larger ints -> int64 (or
  uint64 above 2**63-1) cdata; beyond 64 bits -> error.
- string (20+len) and dictionary reference (0F) -> ``str`` if valid UTF-8, else ``bytes``.
  Encoding accepts ``str`` (as UTF-8), ``bytes``, ``bytearray`` and ``memoryview``.
- table: empty -> ``{}``; a 1-based array without holes (0C) -> ``list``; every other
  table (09, 0A, 0B, 0D, or 0C with holes) -> ``dict``, array slots becoming int keys and
  nil slots left out. Encoding: ``Mapping`` -> hash table (09), ``list``/``tuple`` ->
  1-based array (0C), empty ones -> 08, so ``[]`` comes back as ``{}``.

A ``None`` value in a mapping means "absent key" (Lua cannot store nil): the pair is
skipped. ``None`` in a list would be a hole in a Lua array and is refused: use
:data:`NULL`. Keys may be ``str``/``bytes``, ``bool``, :data:`NULL`, or numbers a double
holds exactly (not NaN). Hash keys found in the dictionary are written as references
(0F), as LuaJIT does; values never are.

As in LuaJIT: at most :data:`MAX_DEPTH` nested tables (empty ones count) and no duplicate
keys in a table. Stricter than ``buf:decode()``: bytes after the object are an error (a
frame payload is exactly one object), and so are tables as keys (a ``dict`` is not
hashable) and tables with both ``true`` and ``1`` as keys (equal in Python). The decoder
uses an explicit stack, not recursion, and checks every length and count against the
bytes left before it allocates anything.

Errors: :func:`dumps` raises only :class:`~shared.errors.LocalProtocolError` for a value it
cannot encode; :func:`loads` raises only :class:`~shared.errors.RemoteProtocolError` for
bytes it cannot decode. Any other exception from either is a bug.
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Final, final

from .errors import LocalProtocolError, RemoteProtocolError

__all__ = ["KONG_DICTIONARY", "MAX_DEPTH", "NULL", "LuaBufferCodec", "LuaNull", "dumps", "loads"]

#: The string dictionary lua-resty-events 0.3.x configures on both buffers (codec.lua).
KONG_DICTIONARY: Final[tuple[str, ...]] = ("spec", "data", "source", "event", "wid", "unique")
#: LuaJIT's LJ_SERIALIZE_DEPTH: deeper nesting fails on both ends, so we refuse it too.
MAX_DEPTH: Final = 100


class LuaNull(enum.Enum):
    """Type of :data:`NULL`; an enum so that ``Literal[LuaNull.NULL]`` type-checks and pickles."""

    NULL = "NULL"

    def __repr__(self) -> str:
        return "LuaNull.NULL"

    def __bool__(self) -> bool:
        # ngx.null stands for "no value", so it should behave like None in a condition.
        return False


#: The NULL lightuserdata (``ngx.null``, ``cjson.null``): a present value, unlike ``None``.
NULL: Final = LuaNull.NULL

_NIL, _FALSE, _TRUE, _NULL = 0x00, 0x01, 0x02, 0x03
_LIGHTUD32, _LIGHTUD64, _INT32, _DOUBLE = 0x04, 0x05, 0x06, 0x07
_TAB_EMPTY, _TAB_HASH, _TAB_ARRAY1 = 0x08, 0x09, 0x0C
_DICT_MT, _DICT_STR, _INT64, _UINT64, _COMPLEX, _STR = 0x0E, 0x0F, 0x10, 0x11, 0x12, 0x20
_U1_MAX, _U2_MAX, _U5_MAX = 0xDF, 0x1FDF, 0xFFFF_FFFF
_EXACT: Final = 2**53  # every int up to this magnitude survives a round trip through a double

_DOUBLE_S, _COMPLEX_S, _U32_S = struct.Struct("<d"), struct.Struct("<dd"), struct.Struct("<I")
_I64_S, _U64_S = struct.Struct("<q"), struct.Struct("<Q")
# Tags whose payload is a little-endian integer of fixed size. A lightuserdata is a pointer
# into the sender's address space, so its number is all that means anything here.
_INTEGERS: Final = {
    _LIGHTUD32: _U32_S,
    _LIGHTUD64: _U64_S,
    _INT32: struct.Struct("<i"),
    _INT64: _I64_S,
    _UINT64: _U64_S,
}

_Bytesish = (str, bytes, bytearray, memoryview)


# --------------------------------------------------------------------------- encoding


def dumps(obj: object, *, dictionary: Sequence[str] = KONG_DICTIONARY) -> bytes:
    """Encode one value the way LuaJIT's ``buf:encode()`` would.

    Args:
        obj: the value; see the module docstring for what each Python type becomes.
        dictionary: the ``dict`` option of the peer's buffer; hash keys found in it are
            written as references.

    Returns:
        The serialized bytes (no frame header).

    Raises:
        LocalProtocolError: a value has no Lua representation (unsupported type, ``None``
            in a list, a bad key, an int beyond 64 bits, nesting deeper than
            :data:`MAX_DEPTH`, a ``str`` that is not encodable as UTF-8).
    """
    out = bytearray()
    _put(out, _key_refs(tuple(dictionary)), obj, 0)
    return bytes(out)


@lru_cache(maxsize=8)
def _key_refs(dictionary: tuple[str, ...]) -> dict[bytes, int]:
    refs: dict[bytes, int] = {}
    for idx, word in enumerate(dictionary):
        # As in LuaJIT (checked), a word listed twice is referenced by its first index.
        refs.setdefault(word.encode("utf-8"), idx)
    return refs


def _put_u(out: bytearray, n: int) -> None:
    """Write ``n`` in LuaJIT's 1/2/5-byte prefix encoding."""
    if n <= _U1_MAX:
        out.append(n)
    elif n <= _U2_MAX:
        n -= 0xE0
        out.append(0xE0 | (n >> 8))
        out.append(n & 0xFF)
    elif n <= _U5_MAX:
        out.append(0xFF)
        out += _U32_S.pack(n)
    else:
        raise LocalProtocolError(f"length {n} does not fit LuaJIT's 32-bit length field")


def _as_bytes(value: str | bytes | bytearray | memoryview) -> bytes:
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise LocalProtocolError(f"string is not encodable as UTF-8: {exc}") from exc
    return bytes(value)


def _put_str(out: bytearray, raw: bytes) -> None:
    _put_u(out, _STR + len(raw))
    out += raw


def _put_int(out: bytearray, n: int) -> None:
    if -_EXACT <= n <= _EXACT:
        out.append(_DOUBLE)  # what x86-64 LuaJIT writes for every number
        out += _DOUBLE_S.pack(float(n))
    elif -(2**63) <= n < 2**63:
        out.append(_INT64)  # exact, and LuaJIT turns it into an int64_t cdata (1LL)
        out += _I64_S.pack(n)
    elif 0 <= n < 2**64:
        out.append(_UINT64)
        out += _U64_S.pack(n)
    else:
        raise LocalProtocolError(f"int {n} does not fit in 64 bits")


def _put(out: bytearray, refs: dict[bytes, int], obj: object, depth: int) -> None:
    # Recursion is bounded by MAX_DEPTH (checked before descending), so it cannot run away
    # even on a self-referencing list.
    if obj is None:
        out.append(_NIL)
    elif obj is True or obj is False:
        out.append(_TRUE if obj else _FALSE)
    elif obj is NULL:
        out.append(_NULL)
    elif isinstance(obj, int):
        _put_int(out, obj)
    elif isinstance(obj, float):
        out.append(_DOUBLE)
        out += _DOUBLE_S.pack(obj)
    elif isinstance(obj, _Bytesish):
        _put_str(out, _as_bytes(obj))
    elif isinstance(obj, (Mapping, list, tuple)):
        _put_table(out, refs, obj, depth + 1)
    elif isinstance(obj, complex):
        out.append(_COMPLEX)
        out += _COMPLEX_S.pack(obj.real, obj.imag)
    else:
        raise LocalProtocolError(f"cannot encode a {type(obj).__name__} as a Lua value")


def _put_table(
    out: bytearray,
    refs: dict[bytes, int],
    obj: Mapping[object, object] | Sequence[object],
    depth: int,
) -> None:
    if depth > MAX_DEPTH:
        raise LocalProtocolError(f"tables nested deeper than {MAX_DEPTH} (or a cycle)")
    if isinstance(obj, Mapping):
        # Lua cannot store a nil value: such a pair is simply not in the table.
        pairs = [(k, v) for k, v in obj.items() if v is not None]
        if pairs:
            out.append(_TAB_HASH)
            _put_u(out, len(pairs))
            seen: set[bytes] = set()  # "a" and b"a" are different dict keys but one Lua key
            for key, value in pairs:
                _put_key(out, refs, key, seen)
                _put(out, refs, value, depth)
            return
    elif obj:
        out.append(_TAB_ARRAY1)
        _put_u(out, len(obj) + 1)  # the count includes the unused slot 0
        for item in obj:
            if item is None:
                raise LocalProtocolError(
                    "None inside a list would be a hole in a Lua array; "
                    "use luabuf.NULL for an explicit null"
                )
            _put(out, refs, item, depth)
        return
    out.append(_TAB_EMPTY)


def _put_key(out: bytearray, refs: dict[bytes, int], key: object, seen: set[bytes]) -> None:
    if isinstance(key, _Bytesish):
        raw = _as_bytes(key)
        if raw in seen:
            raise LocalProtocolError(
                f"duplicate table key: {key!r} is the same Lua string as another key"
            )
        seen.add(raw)
        idx = refs.get(raw)
        if idx is None:
            _put_str(out, raw)
        else:
            out.append(_DICT_STR)
            _put_u(out, idx)
    elif isinstance(key, float) and key != key:
        raise LocalProtocolError("NaN cannot be a Lua table key")
    elif isinstance(key, int) and not isinstance(key, bool) and not -_EXACT <= key <= _EXACT:
        # It would become an int64 cdata, which Lua keys by object identity: unusable.
        raise LocalProtocolError(f"int key {key} is not exactly representable as a Lua number")
    elif isinstance(key, (bool, int, float)) or key is NULL:
        _put(out, refs, key, 0)
    else:
        raise LocalProtocolError(f"a {type(key).__name__} cannot be a Lua table key here")


# --------------------------------------------------------------------------- decoding


def loads(
    data: bytes | bytearray | memoryview, *, dictionary: Sequence[str] = KONG_DICTIONARY
) -> object:
    """Decode exactly one value written by LuaJIT's ``buf:encode()``.

    Args:
        data: the serialized bytes (a whole frame payload, no header).
        dictionary: the ``dict`` option the peer's buffer was created with.

    Returns:
        The value; see the module docstring for the Python type of each Lua type.

    Raises:
        RemoteProtocolError: the bytes are not exactly one valid object: truncated input,
            trailing bytes, an unknown tag or dictionary index, a duplicate or unusable
            key, nesting deeper than :data:`MAX_DEPTH`.
    """
    words = _dict_words(tuple(dictionary))
    return _Reader(bytes(data), words).value()


@lru_cache(maxsize=8)
def _dict_words(dictionary: tuple[str, ...]) -> tuple[str | bytes, ...]:
    # Round the words through bytes so a decoded reference looks like a decoded string.
    return tuple(_lua_string(word.encode("utf-8")) for word in dictionary)


def _lua_string(raw: bytes) -> str | bytes:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw  # Lua strings are bytes; this one is not text, so keep it as it is


def _number(x: float) -> int | float:
    """An integral double within +-2**53 is an int in disguise (x86-64 LuaJIT has no ints)."""
    if -_EXACT <= x <= _EXACT and x.is_integer() and (x or math.copysign(1.0, x) > 0):
        return int(x)
    return x  # -0.0, fractions, NaN, infinities and huge magnitudes stay floats


@final
class _Table:
    """A table whose contents are still being read."""

    __slots__ = ("array_left", "hash_left", "items", "key", "one_based", "pairs", "want_key")

    def __init__(self, one_based: bool, array_len: int, hash_len: int) -> None:
        self.one_based = one_based
        self.array_left = array_len
        self.hash_left = hash_len
        self.items: list[object] = []
        # Filled in by end_array() when there is an array part: it may yet become a list.
        self.pairs: dict[object, object] | None = None if array_len else {}
        self.key: object = None
        self.want_key = True

    def end_array(self) -> None:
        """Decide between list and dict once the array part is complete."""
        if self.one_based and not self.hash_left and None not in self.items:
            return  # a proper Lua sequence: stays a list
        base = 1 if self.one_based else 0
        self.pairs = {i: v for i, v in enumerate(self.items, base) if v is not None}


def _remote(msg: str, pos: int) -> RemoteProtocolError:
    return RemoteProtocolError(f"bad LuaJIT string.buffer data at offset {pos}: {msg}")


@final
class _Reader:
    """One pass over one buffer; ``pos`` only ever moves forward."""

    __slots__ = ("buf", "end", "pos", "words")

    def __init__(self, buf: bytes, words: tuple[str | bytes, ...]) -> None:
        self.buf = buf
        self.end = len(buf)
        self.pos = 0
        self.words = words

    def need(self, n: int) -> int:
        """Claim ``n`` bytes; return where they start."""
        start = self.pos
        if n > self.end - start:
            raise _remote(f"truncated: {n} bytes needed, {self.end - start} left", start)
        self.pos = start + n
        return start

    def u(self) -> int:
        """Read a prefix-encoded unsigned integer (tags, lengths and counts)."""
        first = self.buf[self.need(1)]
        if first < 0xE0:
            return first
        if first < 0xFF:
            return ((first & 0x1F) << 8) + self.buf[self.need(1)] + 0xE0
        # LuaJIT accepts a 5-byte form even for small values, so we do too.
        return int(_U32_S.unpack_from(self.buf, self.need(4))[0])

    def value(self) -> object:
        stack: list[_Table] = []
        buf, end = self.buf, self.end
        while True:
            start = self.pos
            if start < end and buf[start] < 0xE0:  # the common one-byte tag, read inline
                tag = buf[start]
                self.pos = start + 1
            else:
                tag = self.u()
            if _TAB_EMPTY <= tag <= 0x0D:
                table = self.open_table(tag, start, len(stack))
                if table is not None:
                    stack.append(table)
                    continue
                value: object = {}
            else:
                value = self.scalar(tag, start)
            # Hand the value to the innermost open table; finished tables cascade outwards.
            while stack:
                top = stack[-1]
                if not self.store(top, value, start):
                    break
                stack.pop()
                value = top.items if top.pairs is None else top.pairs
            else:
                if self.pos != self.end:
                    raise _remote(
                        f"{self.end - self.pos} trailing bytes after the object", self.pos
                    )
                return value

    def open_table(self, tag: int, start: int, depth: int) -> _Table | None:
        if depth >= MAX_DEPTH:
            raise _remote(f"tables nested deeper than {MAX_DEPTH}", start)
        has_array = tag >= 0x0A
        one_based = tag >= _TAB_ARRAY1
        array_len = self.u() if has_array else 0
        hash_len = self.u() if tag & 1 else 0
        if one_based and array_len:
            array_len -= 1  # slot 0 is counted but never written
        # Every value is at least one byte and every pair two: refuse impossible counts
        # before anything is allocated for them.
        if array_len + 2 * hash_len > self.end - self.pos:
            left = self.end - self.pos
            raise _remote(
                f"table claims {array_len} values, {hash_len} pairs; {left} bytes left", start
            )
        if not array_len and not hash_len:
            return None
        return _Table(one_based, array_len, hash_len)

    def store(self, top: _Table, value: object, start: int) -> bool:
        """Put ``value`` into ``top``; return whether ``top`` is now complete."""
        if top.array_left:
            top.items.append(value)
            top.array_left -= 1
            if not top.array_left:
                top.end_array()
        elif top.want_key:
            top.key = self.check_key(top, value, start)
            top.want_key = False
            return False
        else:
            if value is not None:  # a nil value means the key is absent, as in Lua
                assert top.pairs is not None  # set up by end_array() or __init__
                top.pairs[top.key] = value
            top.hash_left -= 1
            top.want_key = True
        return not top.array_left and not top.hash_left

    @staticmethod
    def check_key(top: _Table, key: object, start: int) -> object:
        """Refuse keys Lua refuses (nil, NaN) and keys Python cannot hold or tell apart."""
        if key is None:
            raise _remote("nil used as a table key", start)
        if isinstance(key, float) and key != key:
            raise _remote("NaN used as a table key", start)
        if isinstance(key, (dict, list)):
            raise _remote("a table used as a table key has no Python equivalent", start)
        assert top.pairs is not None
        if key in top.pairs:
            raise _remote(f"duplicate table key {key!r} (true and 1 count as equal)", start)
        return key

    def scalar(self, tag: int, start: int) -> object:
        if tag >= _STR:
            n = tag - _STR
            at = self.need(n)
            return _lua_string(self.buf[at : at + n])
        if tag <= _NULL:
            return (None, False, True, NULL)[tag]
        if tag == _DOUBLE:
            return _number(_DOUBLE_S.unpack_from(self.buf, self.need(8))[0])
        fixed = _INTEGERS.get(tag)
        if fixed is not None:
            return int(fixed.unpack_from(self.buf, self.need(fixed.size))[0])
        if tag == _DICT_STR:
            idx = self.u()
            if idx >= len(self.words):
                raise _remote(f"dictionary index {idx} is not in the dictionary", start)
            return self.words[idx]
        if tag == _COMPLEX:
            real, imag = _COMPLEX_S.unpack_from(self.buf, self.need(16))
            return complex(real, imag)
        if tag == _DICT_MT:
            # The kong profile configures no metatable dictionary, so LuaJIT refuses it too.
            raise _remote("tag 0x0e (table with a metatable dictionary) is unsupported", start)
        raise _remote(f"unknown tag 0x{tag:02x}", start)


# --------------------------------------------------------------------------- codec object


@final
class LuaBufferCodec:
    """The ``kong`` profile codec in the shape the core expects (``dumps``/``loads``).

    Raises the same errors as the module functions :func:`dumps` and :func:`loads`.
    """

    name: str = "luajit-string-buffer"

    def __init__(self, dictionary: Sequence[str] = KONG_DICTIONARY) -> None:
        self.dictionary: tuple[str, ...] = tuple(dictionary)

    def dumps(self, obj: object) -> bytes:
        """Encode ``obj``; see :func:`dumps`."""
        return dumps(obj, dictionary=self.dictionary)

    def loads(self, data: bytes) -> object:
        """Decode one object from ``data``; see :func:`loads`."""
        return loads(data, dictionary=self.dictionary)
