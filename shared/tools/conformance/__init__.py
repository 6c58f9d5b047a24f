"""The protocol conformance kit: a black-box tester for brokers and a strict broker for clients.

It speaks only the wire contract (its own framing, ``msgpack`` directly, ``shared.luabuf``
for the kong profile) and imports none of the project's broker or client code, so it can
judge any implementation, this project's included. See docs/conformance.md.
"""

from __future__ import annotations

__all__: list[str] = []
