"""Who is on the other end of an accepted Unix socket (``SO_PEERCRED``), and do we trust them.

The socket file's mode is the first gate; this is the second one, and the one that still
holds when an operator loosened the mode (``--mode 666``) or added a group. The kernel fills
``SO_PEERCRED`` at ``connect()`` time, so a peer cannot forge it.

Linux only: on systems without ``SO_PEERCRED`` (macOS, the BSDs), :func:`peer_credentials`
returns None and the broker relies on the file mode alone (it logs that once at start).
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from anyio import TypedAttributeProvider
from anyio.abc import SocketAttribute

__all__ = ["PEERCRED_SUPPORTED", "PeerCredentials", "default_trusted_uids", "peer_credentials"]

#: Whether this platform reports the peer's credentials at all.
PEERCRED_SUPPORTED = hasattr(socket, "SO_PEERCRED")
_UCRED = struct.Struct("3i")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """The peer process as the kernel saw it when it connected."""

    pid: int
    uid: int
    gid: int

    def __str__(self) -> str:
        return f"pid {self.pid}, uid {self.uid}"


def peer_credentials(stream: TypedAttributeProvider) -> PeerCredentials | None:
    """The credentials of the peer of ``stream``, or None when they cannot be known.

    None for streams that are not Unix sockets (e.g. an in-memory pair in tests) and on
    platforms without ``SO_PEERCRED``.
    """
    if not PEERCRED_SUPPORTED:
        return None
    sock: socket.socket | None = stream.extra(SocketAttribute.raw_socket, None)
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None  # the peer is already gone; the read that follows will say so
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid)


def default_trusted_uids(extra: Iterable[int] = ()) -> frozenset[int]:
    """The broker's own effective uid, root, and ``extra``."""
    return frozenset({os.geteuid(), 0, *extra})
