"""The exception hierarchy of workerbus, and nothing else.

Callers catch :class:`BusError` and nothing accidental: no class here subclasses a builtin
value error. Transport conditions (peer gone, stream closed) are anyio's own exceptions
(``anyio.EndOfStream``, ``anyio.BrokenResourceError``, ``anyio.ClosedResourceError``);
timeouts are ``TimeoutError`` from the caller's ``anyio.fail_after``.

Foreign exceptions are translated in exactly one place per library: msgpack errors in
``shared.codec``, h11 errors in ``httpbus.handshake``.
"""

from __future__ import annotations

__all__ = [
    "AddressInUse",
    "BarrierBroken",
    "BusError",
    "HandshakeError",
    "LocalProtocolError",
    "NoWelcome",
    "PayloadTooLarge",
    "ProtocolError",
    "PublishBufferFull",
    "RemoteProtocolError",
    "ScopeNotGranted",
    "UpgradeRejected",
]


class BusError(Exception):
    """Base of every error workerbus raises on purpose."""


class ProtocolError(BusError):
    """Something broke the wire contract (docs/protocol.md).

    Not raised directly: the subclass says whose fault it was.
    """

    def __init__(self, msg: str, *, status_hint: int = 400) -> None:
        if type(self) is ProtocolError:
            raise TypeError("raise LocalProtocolError or RemoteProtocolError instead")
        super().__init__(msg)
        #: The HTTP status httpbus's server answers with when this happens during the upgrade.
        self.status_hint = status_hint


class LocalProtocolError(ProtocolError):
    """*We* were about to do something the contract forbids (e.g. encode a bad value)."""


class RemoteProtocolError(ProtocolError):
    """The *peer* sent something the contract forbids. Fatal to that one connection."""


class PayloadTooLarge(LocalProtocolError):
    """An encoded message is longer than the configured ``max_payload_len``.

    Raised before anything is sent or queued.
    """

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"encoded message is {size} bytes, over max_payload_len={limit}")
        self.size = size
        self.limit = limit


class HandshakeError(BusError):
    """The connection start (HTTP upgrade or hello) did not complete."""


class NoWelcome(HandshakeError):
    """A native client reached something that did not answer its hello with a welcome
    (docs/protocol.md §8), so it cannot know the broker. The message names the likely cause;
    ``cause`` says it in one word:

    - ``"transport"``: the peer speaks the other transport (HTTP bytes on a stream
      connection, or no answer to the HTTP upgrade);
    - ``"profile"``: its reply is not a native frame (a kong-profile broker?);
    - ``"broker"``: no reply at all: not a workerbus broker, or one too old for the welcome.
    """

    def __init__(self, msg: str, cause: str) -> None:
        super().__init__(msg)
        self.cause = cause


class BarrierBroken(BusError):
    """The connection ended before the broker confirmed a :meth:`Client.flush` barrier.

    The events written but not confirmed are kept and re-sent on the next connection
    (at-least-once: they may arrive twice); the client's ``statistics().unconfirmed`` counts
    them.
    """


class UpgradeRejected(HandshakeError):
    """The server answered the HTTP upgrade with something other than a valid 101."""

    def __init__(self, status_code: int, reason: str, body: bytes) -> None:
        text = body.decode("utf-8", "replace").strip()
        head = f"upgrade rejected: HTTP {status_code} {reason}".rstrip()
        super().__init__(f"{head}: {text}" if text else head)
        self.status_code = status_code
        self.reason = reason
        self.body = body


class PublishBufferFull(BusError):
    """The client is disconnected and its bounded publish buffer is full.

    The event was not buffered; it is counted in the client's ``dropped`` statistics.
    """


class ScopeNotGranted(BusError):
    """A publish with ``scope="cluster"`` to a broker that did not grant the ``cluster``
    capability in its welcome (one older than the cluster scope, docs/cluster.md).

    Raised before anything is sent or queued; publishes with that scope buffered before
    the welcome arrived are dropped, counted and logged at ERROR.
    """


class AddressInUse(BusError):
    """Another live broker already listens on the socket path."""
