"""The embedded client's numbered publishes, the short way.

Every publish of an embedded worker to ``all`` or ``others`` carries the next number of
its broadcast stream (``sb``, :mod:`shared.sequence`), so it cannot use the plain
client's :func:`shared.messages.publish_encoder`; going through
:meth:`Sequencer.encode_publish` (a dict, a whole pack, the envelope, the frame) cost a
seed worker about twice the plain client's CPU per publish (2.1 vs 1.1 us in
isolation; docs/benchmarks.md, "Embedded host path, session 4").

:class:`NumberedEncoder` is that method with the plain encoder's idea: once a
``(source, event)`` went through the careful path, the bytes around its data are kept,
and a later publish packs only its data and its number and joins. The bytes are exactly
those of :meth:`Sequencer.encode_publish` (held to it in tests/test_numbered.py); anything
else (other targets, the bus's own source, no data, a long event, a refusal, another
profile) goes the careful way, which also says why it is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .broker import LIFECYCLE_SOURCE
from .codec import MsgpackCodec
from .messages import _FRAMED_ALL_HEADS as _ALL_HEADS
from .messages import _FRAMED_OTHERS_HEADS as _OTHERS_HEADS
from .messages import ALL, OTHERS, Target
from .profile import NATIVE
from .sequence import BROADCAST_KEY, Sequencer

if TYPE_CHECKING:
    from .client import Client

__all__ = ["NumberedEncoder"]

#: (source, event) pairs remembered at most (a worker publishes a handful).
_MAX_KNOWN = 1024
#: Inner events of up to this many bytes take the short path (one-byte bin length):
#: the plain encoder's tables of framed heads (frame header + native publish envelope up
#: to an n-byte event, to all and to others), shared with it.
_SHORT = 0xFF


class NumberedEncoder:
    """:meth:`Sequencer.encode_publish` for one client, with a short path (see the module
    docstring). Use as the client hook ``encode_publish``."""

    __slots__ = ("_careful", "_known", "_limit", "_out", "_rooms", "_spare", "_wid_tail")

    def __init__(self, sequencer: Sequencer) -> None:
        self._careful = sequencer.encode_publish
        self._out = sequencer.out
        #: (source, event) -> the map head up to the data's value, and its length plus
        #: the tail's (wid and the broadcast key).
        self._known: dict[tuple[str, str], tuple[bytes, int]] = {}
        #: This encoder's packer, taken out while in use (a publish made while packing,
        #: e.g. from a dict subclass's items(), finds none and goes the careful way).
        self._spare: list[Callable[[object], bytes]] = []
        self._wid_tail = b""
        #: The client's max_payload_len the rooms were computed for, and the rooms (the
        #: longest inner event that fits it, to all and to others).
        self._limit = -1
        self._rooms = (0, 0)

    def __call__(self, client: Client, source: str, event: str, data: object, target: Target) -> bytes:
        # (one function: this runs per publish)
        if (target is ALL or target is OTHERS) and data is not None and type(source) is str and type(event) is str:
            entry = self._known.get((source, event))
            if entry is None:
                frame = self._careful(client, source, event, data, target)
                self._remember(client, source, event)
                return frame
            spare = self._spare
            if spare:
                pack = spare.pop()
                out = self._out
                # Numbered before packing, as the careful path does (a publish made while
                # packing gets the next number), and taken back if refused after all.
                out.broadcast = number = out.broadcast + 1
                try:
                    packed = pack(data)
                    packed_number = pack(number)
                except (TypeError, ValueError, OverflowError):
                    # Refused: the careful path says why. (This packer may hold half a value.)
                    spare.append(self._new_pack(client))
                    out.broadcast -= 1
                    return self._careful(client, source, event, data, target)
                except BaseException:
                    spare.append(self._new_pack(client))
                    out.broadcast -= 1
                    raise
                spare.append(pack)
                if client.max_payload_len != self._limit:
                    self._set_rooms(client.max_payload_len)
                around, fixed = entry
                size = fixed + len(packed) + len(packed_number)
                if size <= self._rooms[target is OTHERS]:
                    heads = _OTHERS_HEADS if target is OTHERS else _ALL_HEADS
                    return b"".join((heads[size], around, packed, self._wid_tail, packed_number))
                out.broadcast -= 1  # (the careful path numbers it, or says why not)
        return self._careful(client, source, event, data, target)

    def _set_rooms(self, limit: int) -> None:
        # An inner event of n bytes makes an outer message of len(head) - 2 + n bytes.
        self._limit = limit
        self._rooms = (
            min(_SHORT, limit - (len(_ALL_HEADS[0]) - 2)),
            min(_SHORT, limit - (len(_OTHERS_HEADS[0]) - 2)),
        )

    @staticmethod
    def _new_pack(client: Client) -> Callable[[object], bytes]:
        codec = client.profile.codec
        assert isinstance(codec, MsgpackCodec)
        return codec.new_pack()

    def _remember(self, client: Client, source: str, event: str) -> None:
        # After a careful publish of these names went through (both are encodable).
        codec = client.profile.codec
        if (
            client.profile is not NATIVE
            or not isinstance(codec, MsgpackCodec)
            or type(client.worker_id) is not int
            or source == LIFECYCLE_SOURCE  # (not numbered)
        ):
            return
        if not self._wid_tail:
            # after the data: wid, then the broadcast key (its number is packed per event)
            self._wid_tail = b"\xa3wid" + codec.dumps(client.worker_id) + codec.dumps(BROADCAST_KEY)
            self._spare.append(codec.new_pack())
        if len(self._known) >= _MAX_KNOWN:
            self._known.clear()
        # {source, event, data, wid, sb}: the order Sequencer.encode_publish builds.
        around = b"\x85\xa6source" + codec.dumps(source) + b"\xa5event" + codec.dumps(event) + b"\xa4data"
        self._known[(source, event)] = (around, len(around) + len(self._wid_tail))
