"""Give the memory of a storm back to the kernel once the storm is over (glibc only).

Why this exists, measured on the project's machine with ``benchmarks/ghosts.py`` and
``benchmarks/halfframes.py`` (docs/hardening.md §1.1): after the queues of 1,000 ghost ids
expired, or 1,000 connections that hung inside a frame were closed, the broker stayed at
its peak resident size (tens of MiB above where it started), for two reasons:

- A connection's tasks end in reference cycles (a cancelled task's exception, its
  traceback, the frames of the connection's coroutines, which hold the connection and its
  frame buffer), so its buffers are freed only when the cyclic garbage collector next runs
  a full collection, which in an idle broker can be much later.
- glibc's ``free`` gives memory back to the kernel only from the top of the heap; the few
  objects that stay live sit between the freed chunks, so the freed pages stay resident.
  ``malloc_trim(0)`` releases every whole free page inside the heap too (``madvise``).

:func:`reclaim_memory` does both. A full collection costs time in proportion to the live
objects plus the garbage (tens of milliseconds for an idle broker, a few hundred once after
1,000 connections died together; the collector would spend that anyway, only later), so
the broker calls it from its once-a-second housekeeping, and only after a lot was let go.
Where there is no glibc (musl, macOS) the trim is skipped: those allocators behave
differently, and the figures in docs/hardening.md are glibc's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable

__all__ = ["reclaim_memory"]


def _find_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _find_malloc_trim()


def reclaim_memory() -> bool:
    """Collect cyclic garbage, then give free heap pages back to the kernel; returns
    False where the second part is not possible here."""
    gc.collect()
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True
