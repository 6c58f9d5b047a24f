"""atheris harness: payload codecs and message schemas (shared/codec.py, shared/luabuf.py,
shared/messages.py).

Invariants, for any bytes, in both profiles (native = MessagePack, kong = LuaJIT
string.buffer):
- ``codec.loads`` and ``decode_hello`` / ``decode_publish`` / ``decode_event`` raise only
  RemoteProtocolError;
- whatever ``loads`` returns, ``dumps`` either re-encodes it or raises LocalProtocolError
  (never anything else), and a re-encoded value decodes to an equal value.

MessagePack decoding is msgpack's C extension, which atheris cannot see into: for the
native profile the fuzzer is blind (random mutation); shared/luabuf.py is pure Python and
fully instrumented.

Run: .venv/bin/python fuzz/fuzz_codec.py -atheris_runs=1000000 -timeout=5 fuzz/corpus/codec
"""

from __future__ import annotations

import math
import sys

import atheris

with atheris.instrument_imports(include=["shared", "msgpack"]):
    from shared.errors import LocalProtocolError, RemoteProtocolError
    from shared.messages import decode_event, decode_hello, decode_publish
    from shared.profile import get_profile

    # Inside the block: the kong profile imports shared.luabuf on first use.
    PROFILES = [get_profile("native"), get_profile("kong")]


def _has_nan(value: object) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, complex):
        return math.isnan(value.real) or math.isnan(value.imag)
    if isinstance(value, dict):
        return any(_has_nan(k) or _has_nan(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_has_nan(v) for v in value)
    return False


def test_one_input(raw: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(raw)
    profile = PROFILES[fdp.ConsumeIntInRange(0, 1)]
    data = fdp.ConsumeBytes(fdp.remaining_bytes())
    for decode in (decode_hello, decode_publish, decode_event):
        try:
            decode(profile, data)
        except RemoteProtocolError:
            pass
    try:
        value = profile.codec.loads(data)
    except RemoteProtocolError:
        return
    try:
        again = profile.codec.dumps(value)
    except LocalProtocolError:
        return
    if not _has_nan(value):
        assert profile.codec.loads(again) == value, (value, again)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
