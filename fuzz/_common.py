"""Shared bits of the atheris harnesses: chunking input the way a socket might."""

from __future__ import annotations

import atheris


def chunks(fdp: atheris.FuzzedDataProvider, data: bytes) -> list[bytes]:
    """Split ``data`` at fuzzer-chosen points (1..64 pieces), like reads from a socket."""
    pieces = fdp.ConsumeIntInRange(1, 64)
    cuts = sorted(fdp.ConsumeIntInRange(0, len(data)) for _ in range(pieces - 1))
    out: list[bytes] = []
    start = 0
    for cut in [*cuts, len(data)]:
        out.append(data[start:cut])
        start = cut
    return out
