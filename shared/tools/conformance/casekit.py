"""What every case is made of: the registry, the per-case context and its helpers.

A case is a function ``(ctx) -> None`` that raises :class:`CaseFailed` with a reason (what was
sent, what was expected, what came back) or :class:`CaseSkipped`. Everything it opens goes
through ``ctx`` so the runner can close it, whatever happens.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from shared.tools.conformance.profiles import Profile, hexabbr
from shared.tools.conformance.wire import (
    UPGRADE_REQUEST,
    UPGRADE_TOKEN,
    Conn,
    HttpHead,
    PeerClosed,
    WaitTimeout,
    parse_head,
)

__all__ = ["REGISTRY", "Case", "CaseFailed", "CaseSkipped", "Ctx", "KitConfig", "case"]

#: ``source`` of every event the kit publishes; the run nonce in ``event`` tells our
#: deliveries apart from anything else the broker may be relaying.
SOURCE = "conformance"
#: How many frames a reader skips (foreign traffic, stale queue entries) before giving up.
MAX_SKIPPED_FRAMES = 50_000
#: Probe round trips of :meth:`Ctx.settle`.
SETTLE_ROUND_TRIPS = 2


class CaseFailed(Exception):
    """The broker did not do what the contract says; the message is the reason."""


class CaseSkipped(Exception):
    """The case cannot run against this broker/configuration; the message says why."""


@dataclass(frozen=True)
class KitConfig:
    """Everything the user told the kit about the broker under test."""

    address: str
    path: str
    transport: str
    profile: Profile
    case_timeout: float = 5.0
    handshake_deadline: float = 5.0
    unique_timeout: float = 5.0
    workers: int | None = None
    max_payload: int | None = None
    id_base: int = 1000
    #: the broker implements the negotiated native extensions (welcome, barrier)
    extensions: bool = True
    nonce: str = field(default_factory=lambda: os.urandom(4).hex())


@dataclass(frozen=True)
class Case:
    name: str
    summary: str
    func: Callable[[Ctx], None]
    http_only: bool = False
    #: Why the case does not apply to the kong profile, when it does not.
    native_only: str | None = None


#: Every registered case, in definition order within its module; the runner fixes the order
#: of the modules.
REGISTRY: list[Case] = []


def case(
    name: str, summary: str, *, http_only: bool = False, native_only: str | None = None
) -> Callable[[Callable[[Ctx], None]], Callable[[Ctx], None]]:
    """Register a case; registration order is run order and fixes each case's worker ids."""

    def register(func: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
        REGISTRY.append(Case(name, summary, func, http_only, native_only))
        return func

    return register


class Ctx:
    """One case's view of the broker: fresh connections, worker ids, events, deadlines."""

    def __init__(self, cfg: KitConfig, name: str, index: int) -> None:
        self.cfg = cfg
        self.profile = cfg.profile
        self.name = name
        # Ten ids per case, far from the 0..N-1 a broker may pre-create, so cases never share
        # a broker queue (PROTOCOL.md §5: queues outlive disconnects).
        self.id0 = cfg.id_base + index * 10
        self.started = time.monotonic()
        self.deadline = self.started + cfg.case_timeout
        self.conns: list[Conn] = []
        self.labels: dict[bytes, str] = {}
        #: In every event name this case publishes; tells its deliveries from others.
        self.marker = f"{cfg.nonce}/{name}/".encode()
        self._counter = 0

    # -- bookkeeping ---------------------------------------------------------------------
    def close_all(self) -> None:
        for conn in self.conns:
            conn.close()

    def settle(self, conn: Conn, wid: int) -> None:
        """Let the broker catch up with what this case did before (e.g. a close) by round
        trips instead of a sleep: ``conn`` publishes a probe to all and reads until it is
        back, so the broker has read and routed everything sent before it. A close on
        another connection is read by the broker no later than the probe that was sent
        after it, and acted on in the loop turns a round trip takes; two make that margin
        wide. The probe carries no case marker, so every reader of the case skips it as
        foreign traffic (:meth:`ours`)."""
        for _ in range(SETTLE_ROUND_TRIPS):
            self._counter += 1
            probe = self.profile.encode(
                {"source": SOURCE, "event": f"{self.cfg.nonce}/settle/{self._counter}", "wid": wid}
            )
            self.publish(conn, {}, probe)
            self.collect(conn, probe, f"worker {wid} (settling)")

    def describe(self, frames: Iterable[bytes]) -> str:
        """Frames as event labels where we know them, hex otherwise."""
        return "[" + ", ".join(self.labels.get(f, hexabbr(f)) for f in frames) + "]"

    def ours(self, frame: bytes) -> bool:
        """Whether a delivery belongs to this case: published by it (byte-identical) or
        carrying its ``nonce/case/`` event-name prefix. Anything else (other traffic, stale
        queue entries of earlier cases or runs) is not this case's business."""
        return frame in self.labels or self.marker in frame

    # -- building messages ---------------------------------------------------------------
    def hello(self, wid: int) -> bytes:
        return self.profile.encode({"id": wid, "pid": os.getpid()})

    def tagged(self, tag: str) -> str:
        """A string that marks whatever carries it as this case's (see :meth:`ours`)."""
        return f"{self.marker.decode()}{tag}"

    def event(self, wid: int, tag: str, data: object = None) -> bytes:
        """A fresh inner event published by ``wid``; remembered under ``tag`` for reports."""
        self._counter += 1
        obj: dict[str, object] = {
            "source": SOURCE,
            "event": self.tagged(f"{tag}/{self._counter}"),
            "wid": wid,
        }
        if data is not None:
            obj["data"] = data
        return self.label(self.profile.encode(obj), tag)

    def label(self, inner: bytes, tag: str) -> bytes:
        self.labels[inner] = tag
        return inner

    def publish_payload(self, spec: object, inner: object) -> bytes:
        """A publish message; ``spec`` and ``inner`` may be wrong on purpose (bad.* cases)."""
        return self.profile.encode({"spec": spec, "data": inner})

    def publish_frame(self, spec: dict[str, object], inner: bytes) -> bytes:
        return self.profile.frame(self.publish_payload(spec, inner))

    # -- connections ---------------------------------------------------------------------
    def connect(self) -> Conn:
        try:
            conn = Conn.connect(self.cfg.path, self.profile, self.deadline)
        except OSError as exc:
            raise CaseFailed(f"cannot connect to {self.cfg.address}: {exc}") from exc
        self.conns.append(conn)
        return conn

    def read_response(self, conn: Conn, sent: bytes) -> HttpHead:
        try:
            raw = conn.read_head(self.deadline)
            return parse_head(raw[:-4])
        except (PeerClosed, WaitTimeout, ValueError) as exc:
            raise CaseFailed(f"sent {hexabbr(sent)}, expected an HTTP response: {exc}") from exc

    def upgrade(self, conn: Conn, request: bytes = UPGRADE_REQUEST) -> None:
        """Send ``request`` and require a valid 101 (status, Upgrade token, Connection)."""
        conn.send(request)
        self.check_101(conn, request)

    def check_101(self, conn: Conn, request: bytes) -> None:
        head = self.read_response(conn, request)
        problems = []
        if head.version != "HTTP/1.1" or head.status != 101:
            problems.append(f"status line {head.version} {head.status} {head.reason}")
        if not any(v.lower() == UPGRADE_TOKEN.lower() for v in head.values("Upgrade")):
            problems.append(f"Upgrade header {head.values('Upgrade')}")
        if not head.has_token("Connection", "upgrade"):
            problems.append(f"Connection header {head.values('Connection')}")
        if problems:
            raise CaseFailed(
                f"sent {request!r}, expected 101 with Upgrade: {UPGRADE_TOKEN} and Connection: "
                f"upgrade, got {'; '.join(problems)}"
            )

    def worker(self, wid: int) -> Conn:
        """A connected worker: connect, upgrade (http), hello."""
        conn = self.connect()
        conn.label = f"worker {wid}"
        if self.cfg.transport == "http":
            self.upgrade(conn)
        conn.send(self.profile.frame(self.hello(wid)))
        return conn

    def publish(self, conn: Conn, spec: dict[str, object], inner: bytes) -> None:
        conn.send(self.publish_frame(spec, inner))

    # -- reading deliveries --------------------------------------------------------------
    def collect(self, conn: Conn, stop: bytes, who: str) -> list[bytes]:
        """This case's deliveries on ``conn`` up to and including the frame ``stop``.

        Frames that are not this case's (see :meth:`ours`) are skipped, bounded by count
        and by the case deadline.
        """
        got: list[bytes] = []
        for _ in range(MAX_SKIPPED_FRAMES):
            try:
                frame = conn.read_frame(self.deadline)
            except (PeerClosed, WaitTimeout) as exc:
                raise CaseFailed(
                    f"{who}: expected delivery {self.describe([stop])}, "
                    f"after receiving {self.describe(got)}: {exc}"
                ) from exc
            if frame == stop:
                got.append(frame)
                return got
            if self.marker in frame and frame not in self.labels:
                # Ours by name but not byte-identical to anything we published: changed in
                # transit (re-encoded, truncated, merged) or never published at all.
                raise CaseFailed(
                    f"{who}: got a delivery that matches nothing this case published "
                    f"(re-encoded or mangled?): {hexabbr(frame, 48)}; expected "
                    f"{self.describe([stop])} = {hexabbr(stop, 48)}, after {self.describe(got)}"
                )
            if self.ours(frame):
                got.append(frame)
        raise CaseFailed(f"{who}: {MAX_SKIPPED_FRAMES} foreign frames, never {self.describe([stop])}")

    def expect(self, conn: Conn, expected: list[bytes], who: str) -> None:
        """This case's next deliveries on ``conn`` must be exactly ``expected``."""
        got = self.collect(conn, expected[-1], who)
        if got != expected:
            raise CaseFailed(
                f"{who}: expected deliveries {self.describe(expected)}, got {self.describe(got)}"
            )

    def expect_closed(self, conn: Conn, who: str, sent: bytes) -> None:
        if not conn.closed_by_peer(self.deadline):
            raise CaseFailed(
                f"{who}: sent {hexabbr(sent)}, expected the broker to close this connection, "
                f"still open after {self.cfg.case_timeout:g}s"
            )

    def roundtrip(self, conn: Conn, wid: int, who: str, others: Iterable[Conn] = (),
                  *, queued: bool = False) -> None:
        """``conn`` publishes to all and gets its own event back, and so does every one of
        ``others`` (workers already known to be registered). ``queued``: ``wid`` is an id
        the broker pre-created, whose queue may hold this case's earlier broadcasts; they
        are read past."""
        probe = self.event(wid, f"roundtrip-{wid}")
        self.publish(conn, {}, probe)
        if queued:
            self.collect(conn, probe, who)
        else:
            self.expect(conn, [probe], who)
        for other in others:
            self.expect(other, [probe], f"{who}'s round trip seen by an earlier worker")

    def join(self, wids: Iterable[int], *, pre_created: int = 0) -> list[Conn]:
        """Connect workers one at a time, each confirmed registered by a round trip that
        every worker connected so far also drains, so later expectations start clean.
        Ids below ``pre_created`` have broker queues from the start (``--workers``)."""
        conns: list[Conn] = []
        for wid in wids:
            conn = self.worker(wid)
            self.roundtrip(conn, wid, f"worker {wid}", conns, queued=0 <= wid < pre_created)
            conns.append(conn)
        return conns

    def check_bystander(self, bystander: Conn, wid: int) -> None:
        """The broker still serves an innocent connection and accepts new ones."""
        self.roundtrip(bystander, wid, f"bystander {wid}")
        fresh_id = self.id0 + 9
        self.roundtrip(self.worker(fresh_id), fresh_id, f"new connection {fresh_id}")
