"""What a Unix socket path must be before anything binds or connects to it.

No project imports: the conformance kit (a black box to the rest) uses it too.
"""

from __future__ import annotations

import os

__all__ = ["MAX_PATH_BYTES", "check_socket_path", "socket_path"]

#: ``sun_path`` is 108 bytes on Linux, and Python keeps one for the terminating NUL.
MAX_PATH_BYTES = 107


def check_socket_path(path: str) -> None:
    """Raise ValueError, with the reason, unless ``path`` can name a Unix socket reliably.

    A relative path would be looked up from each process's working directory (a broker and
    its workers rarely share one), and an over-long one cannot be connected to at all: the
    broker binds under a short name and links it into place, so without this check it
    would report itself ready on a path that no client can reach.
    """
    if not os.path.isabs(path):
        raise ValueError(f"socket path {path!r} is relative; give an absolute path (unix:/...)")
    size = len(os.fsencode(path))
    if size > MAX_PATH_BYTES:
        raise ValueError(
            f"socket path is {size} bytes long, over the {MAX_PATH_BYTES} bytes AF_UNIX allows: {path}"
        )


def socket_path(address: str) -> str:
    """``unix:/abs/path.sock`` -> ``/abs/path.sock``; ValueError, with the reason, otherwise."""
    if not address.startswith("unix:") or len(address) == len("unix:"):
        raise ValueError(f'address must start with "unix:" and name a path, got {address!r}')
    path = address[len("unix:") :]
    check_socket_path(path)
    return path
