"""atheris harness: the frame decoder (shared/frame.py).

Invariants, for any bytes in any chunking, both header widths, any limit:
- only RemoteProtocolError escapes, and after one the decoder stays failed;
- never more than ``max_frame_len + header_len`` bytes are buffered;
- the payloads are exactly those of a naive reference parser of the whole input.

Run: .venv/bin/python fuzz/fuzz_frame.py -atheris_runs=1000000 -timeout=5 fuzz/corpus/frame
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["shared"]):
    from shared.errors import RemoteProtocolError
    from shared.frame import FrameDecoder

from _common import chunks


def reference(data: bytes, hlen: int, limit: int) -> tuple[list[bytes], bool]:
    """Payloads of ``data`` and whether it is valid (no oversize, no truncation)."""
    out: list[bytes] = []
    pos = 0
    while len(data) - pos >= hlen:
        length = int.from_bytes(data[pos : pos + hlen], "big")
        if length > limit:
            return out, False
        if pos + hlen + length > len(data):
            return out, False
        out.append(data[pos + hlen : pos + hlen + length])
        pos += hlen + length
    return out, pos == len(data)


def test_one_input(raw: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(raw)
    hlen = fdp.PickValueInList([2, 3])
    limit = fdp.ConsumeIntInRange(0, min(4096, (1 << (8 * hlen)) - 1))
    data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 8192))
    decoder = FrameDecoder(hlen, limit)
    got: list[bytes] = []
    failed = False
    try:
        for piece in chunks(fdp, data):
            got.extend(decoder.feed(piece))
            assert decoder.buffered <= limit + hlen, (decoder.buffered, limit)
        decoder.eof()
    except RemoteProtocolError:
        failed = True
        try:
            decoder.feed(b"\x00\x00")
        except RemoteProtocolError:
            pass
        else:
            raise AssertionError("decoder resumed after an error") from None
    expected, valid = reference(data, hlen, limit)
    assert failed == (not valid), (failed, valid)
    if valid:
        assert got == expected
    else:
        assert got == expected[: len(got)]


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
