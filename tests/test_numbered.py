"""The embedded client's numbered publishes, the short way (shared/numbered.py): the
same bytes as :meth:`Sequencer.encode_publish`, the careful path it shortens."""

from __future__ import annotations

from typing import Any

import pytest

import streambus  # noqa: F401  (transport="stream")
from shared.embed import EmbeddedClient
from shared.errors import LocalProtocolError, PayloadTooLarge
from shared.messages import ALL, OTHERS, parse_target
from shared.numbered import NumberedEncoder
from shared.sequence import Sequencer


class _Odd(dict[str, Any]):
    """A dict whose items() publishes while it is being packed."""

    def __init__(self, encode: Any, *args: Any) -> None:
        super().__init__(a=1)
        self.encode, self.args = encode, args

    def items(self) -> Any:
        self.inner = self.encode(*self.args)
        return super().items()


def test_numbered_encoder_makes_the_careful_bytes() -> None:
    client = EmbeddedClient("unix:/nonexistent/bus.sock", transport="stream", worker_id=3, workers=4)
    careful, short = Sequencer(3, lambda *a: None), Sequencer(3, lambda *a: None)
    fast = NumberedEncoder(short)
    cases: list[tuple[str, str, Any, Any]] = []
    for i in range(70_000):  # the broadcast number crosses msgpack's int widths
        cases.append(("cache", "purge", {"i": i}, ALL if i % 3 else OTHERS))
    cases += [
        ("cache", "purge", "x" * 200, ALL),  # over the short path's 255 bytes
        ("cache", "purge", "x" * 300, OTHERS),
        ("cache", "purge", None, ALL),
        ("cache", "other", [1, 2], parse_target("worker:1")),
        ("cache", "purge", {"i": object()}, ALL),  # refused: no number used up
        ("cache", "purge", b"y" * 70_000, ALL),  # too large: likewise
        ("cache", "purge", 1.5, OTHERS),
        ("workerbus", "sync", {"sb": 1}, OTHERS),
        ("", "purge", 1, ALL),
        ("cache", "purge", {"i": -1}, ALL),
    ]
    for case in cases:
        outcomes: list[object] = []
        for encode in (careful.encode_publish, fast):
            try:
                outcomes.append(encode(client, *case))
            except (PayloadTooLarge, LocalProtocolError, ValueError, TypeError) as exc:
                outcomes.append(type(exc))
        assert outcomes[0] == outcomes[1], case
        assert careful.out.marks() == short.out.marks()
    # a publish made while packing (the encoder's packer is in use) goes the careful way
    odd = _Odd(fast, client, "cache", "purge", {"n": 1}, ALL)
    mine = fast(client, "cache", "purge", odd, ALL)
    odd_too = _Odd(careful.encode_publish, client, "cache", "purge", {"n": 1}, ALL)
    theirs = careful.encode_publish(client, "cache", "purge", odd_too, ALL)
    assert (odd.inner, mine) == (odd_too.inner, theirs)
    assert careful.out.marks() == short.out.marks()
    # a lower limit from a welcome applies at once
    client.max_payload_len = 40
    with pytest.raises(PayloadTooLarge):
        fast(client, "cache", "purge", {"i": 12345}, ALL)
    with pytest.raises(PayloadTooLarge):
        careful.encode_publish(client, "cache", "purge", {"i": 12345}, ALL)
    assert careful.out.marks() == short.out.marks()
