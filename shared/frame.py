"""Sans-IO length-prefixed framing (docs/protocol.md §3).

    | length: header_len bytes, unsigned big-endian | payload: length bytes |

:class:`FrameDecoder` turns any chunking of the byte stream into whole payloads. It checks
each announced length against its limit *before* buffering a byte of that frame, so a peer
cannot make it allocate more than ``max_frame_len + header_len`` bytes. After an error the
decoder is latched: every later call raises again (a decoder is never resumed mid-garbage).

What it holds of an incomplete frame is what arrived, in the size it arrived: reads of
some size are kept as the very ``bytes`` objects that were read (no copy, no spare room),
small ones are gathered in one ``bytearray``; nothing is ever sized from a header, and
nothing is reallocated while a frame grows (which, with many connections, leaves the heap
full of holes: docs/hardening.md §1).

The frame layer never interprets payloads; that lets the broker forward opaque bytes.
"""

from __future__ import annotations

from .errors import LocalProtocolError, RemoteProtocolError

__all__ = ["FrameDecoder", "encode_frame", "frame_header"]

#: Reads shorter than this are copied into one gathering buffer rather than kept as they
#: are: a peer that dribbles bytes must not cost an object per byte.
_SMALL_READ = 1024


def frame_header(length: int, header_len: int) -> bytes:
    """The length prefix for a payload of ``length`` bytes."""
    try:
        return length.to_bytes(header_len, "big")
    except OverflowError:
        raise LocalProtocolError(
            f"payload of {length} bytes does not fit a {header_len}-byte frame header"
        ) from None


def encode_frame(payload: bytes, header_len: int = 2) -> bytes:
    """One whole frame: the length prefix followed by ``payload``. The one way a frame is
    built (it runs once per delivery in the broker: no call besides ``to_bytes``).

    Raises:
        LocalProtocolError: the payload does not fit a frame of this header width.
    """
    try:
        return len(payload).to_bytes(header_len, "big") + payload
    except OverflowError:
        raise LocalProtocolError(
            f"payload of {len(payload)} bytes does not fit a {header_len}-byte frame header"
        ) from None


class FrameDecoder:
    """Incremental frame parser.

    Feed it bytes as they arrive; it returns the payloads completed so far. ``eof()`` says
    the stream ended and raises if that cut a frame in half.

    Args:
        header_len: 2 (native profile) or 3 (kong profile).
        max_frame_len: the largest payload accepted; larger announced lengths raise
            :class:`RemoteProtocolError` at once. Defaults to what the header can express.
    """

    __slots__ = ("_error", "_header_len", "_held", "_max", "_need", "_pieces", "_small")

    def __init__(self, header_len: int = 2, max_frame_len: int | None = None) -> None:
        limit = (1 << (8 * header_len)) - 1
        if max_frame_len is None:
            max_frame_len = limit
        if not 0 <= max_frame_len <= limit:
            raise ValueError(f"max_frame_len must be within 0..{limit}")
        self._header_len = header_len
        self._max = max_frame_len
        # The incomplete frame's bytes, in order: whole reads, and small ones gathered in
        # ``_small`` (which always comes after the pieces). ``_held`` is their total.
        self._pieces: list[bytes] = []
        self._small = bytearray()
        self._held = 0
        # Bytes the pending buffer must reach before a parse can yield anything; skipping
        # the parse until then keeps a frame that dribbles in linear, not quadratic.
        self._need = header_len
        self._error: str | None = None

    def fresh(self) -> FrameDecoder:
        """An empty decoder with the same settings (FrameStream.peek parses with one)."""
        return FrameDecoder(self._header_len, self._max)

    @property
    def buffered(self) -> int:
        """How many bytes of incomplete frames are held."""
        return self._held

    @property
    def wanted(self) -> int:
        """How many bytes the held ones must reach before the next frame is whole: its
        header plus payload, once its header is in (else the header's width)."""
        return self._need

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data`` and return every payload it completed, in order.

        Raises:
            RemoteProtocolError: a frame announced more than ``max_frame_len`` bytes.
        """
        if self._error is not None:
            raise RemoteProtocolError(self._error)
        if self._held:
            self._hold(data)
            if self._held < self._need:
                return []
            buf = self._take()
        else:
            buf = data
        return self._parse(buf)

    def _hold(self, data: bytes) -> None:
        if len(data) >= _SMALL_READ:
            if self._small:
                self._pieces.append(bytes(self._small))
                self._small.clear()  # (frees its memory: a bytearray shrinks on clear)
            self._pieces.append(data if type(data) is bytes else bytes(data))
        else:
            self._small += data
        self._held += len(data)

    def _take(self) -> bytes:
        pieces = self._pieces
        if self._small:
            pieces.append(bytes(self._small))
            self._small.clear()
        buf = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        self._held = 0
        return buf

    def _parse(self, buf: bytes) -> list[bytes]:
        # Every delivery goes through here: the length is read from byte values (no slice,
        # no int.from_bytes per frame), and the payload is the only copy made.
        two = self._header_len == 2
        hlen = self._header_len
        limit = self._max
        end = len(buf)
        pos = 0
        out: list[bytes] = []
        append = out.append
        while end - pos >= hlen:
            if two:
                length = (buf[pos] << 8) | buf[pos + 1]
            else:
                length = (buf[pos] << 16) | (buf[pos + 1] << 8) | buf[pos + 2]
            if length > limit:
                self._error = f"frame announces {length} bytes, over the limit of {limit}"
                if out:
                    # The frames before the bad header are whole and valid: hand them
                    # over; the error is raised by the next call (see ``failed``).
                    return out
                raise RemoteProtocolError(self._error)
            start = pos + hlen
            stop = start + length
            if stop > end:
                self._need = stop - pos
                break
            append(buf[start:stop])
            pos = stop
        else:
            self._need = hlen
        if pos < end:
            self._hold(buf[pos:] if pos else buf)
        return out

    @property
    def failed(self) -> bool:
        """True once the stream is known to be broken; every later call raises."""
        return self._error is not None

    def eof(self) -> None:
        """The stream ended. Raises if it ended inside a frame.

        Raises:
            RemoteProtocolError: bytes of an incomplete frame were pending.
        """
        if self._error is not None:
            raise RemoteProtocolError(self._error)
        if self._held:
            self._error = f"stream ended inside a frame ({self._held} bytes pending)"
            raise RemoteProtocolError(self._error)
