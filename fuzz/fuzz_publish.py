"""atheris harness: the broker's read path for publishes (shared/messages.py).

``decode_publish_batch`` reads the common publish (native profile, ``all``/``others``, a
short event) straight from its bytes instead of through the codec. Invariant, for any list
of payloads in both profiles: it returns exactly what ``decode_publish`` gives frame by
frame (same targets, same delivery frames, in order) and stops at the same bad frame, with
a RemoteProtocolError and nothing else.

Run: .venv/bin/python fuzz/fuzz_publish.py -atheris_runs=1000000 -timeout=5 CORPUS_DIR
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["shared"]):
    from shared.errors import RemoteProtocolError
    from shared.frame import frame_header
    from shared.messages import ALL, OTHERS, decode_publish, decode_publish_batch, encode_publish
    from shared.profile import get_profile

    PROFILES = [get_profile("native"), get_profile("kong")]


def test_one_input(raw: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(raw)
    profile = PROFILES[fdp.ConsumeIntInRange(0, 1)]
    payloads: list[bytes] = []
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        if fdp.ConsumeBool():
            # a well-formed publish around fuzzer bytes, to reach the fast path often
            target = ALL if (fdp.ConsumeBool() or not profile.extended_targets) else OTHERS
            payloads.append(encode_publish(profile, target, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300))))
        else:
            payloads.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)))
    runs, error = decode_publish_batch(profile, payloads)
    expected = []
    expected_error = None
    for payload in payloads:
        try:
            target, inner = decode_publish(profile, payload)
        except RemoteProtocolError as exc:
            expected_error = exc
            break
        expected.append((target, frame_header(len(inner), profile.header_len) + inner))
    assert [(t, f) for t, run in runs for f in run] == expected
    assert (error is None) == (expected_error is None)
    assert error is None or isinstance(error, RemoteProtocolError)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
