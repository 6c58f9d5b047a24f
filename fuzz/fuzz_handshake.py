"""atheris harness: both sides of the HTTP upgrade (httpbus/handshake.py).

Invariants, for any bytes in any chunking followed by EOF:
- the server side never raises: it returns None (need more) or a ServerOutcome; an
  accepted outcome's trailing bytes are exactly what was fed after the request head; a
  refusal carries a response that is itself a parseable HTTP response;
- the client side raises only HandshakeError (UpgradeRejected is one).

Run: .venv/bin/python fuzz/fuzz_handshake.py -atheris_runs=1000000 -timeout=5 fuzz/corpus/handshake
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["httpbus", "h11"]):
    import h11

    from httpbus.handshake import ClientHandshake, ServerHandshake
    from shared.errors import HandshakeError

from _common import chunks

_SEED = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: Kong-Worker-Events/1\r\n\r\n"


def server(fdp: atheris.FuzzedDataProvider, data: bytes) -> None:
    hs = ServerHandshake(max_header_bytes=fdp.ConsumeIntInRange(64, 4096))
    outcome = None
    fed = b""
    for piece in [*chunks(fdp, data), b""]:
        fed += piece
        outcome = hs.receive_data(piece)
        if outcome is not None:
            break
    if outcome is None:
        return
    if outcome.accepted:
        # Nothing read past the head is lost: it is all in ``trailing``.
        assert fed.endswith(outcome.trailing) and fed[: len(fed) - len(outcome.trailing)].endswith(b"\r\n\r\n")
        assert outcome.response.startswith(b"HTTP/1.1 101 ")
    elif outcome.response:
        # What we answer must itself be valid HTTP.
        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        client.send(h11.EndOfMessage())
        client.receive_data(outcome.response)
        event = client.next_event()
        assert isinstance(event, h11.Response) and event.status_code >= 400, event


def client(fdp: atheris.FuzzedDataProvider, data: bytes) -> None:
    hs = ClientHandshake()
    try:
        for piece in [*chunks(fdp, data), b""]:
            if hs.receive_data(piece) is not None:
                return
    except HandshakeError:
        return


def test_one_input(raw: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(raw)
    side = fdp.ConsumeBool()
    prefix = fdp.ConsumeBool()
    data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096))
    if side:
        server(fdp, (_SEED if prefix else b"") + data)
    else:
        resp = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: Kong-Worker-Events/1\r\n\r\n"
        client(fdp, (resp if prefix else b"") + data)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
