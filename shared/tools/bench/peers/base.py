"""What a benchmarked peer provides, and helpers the peers share.

A peer is one way of fanning events out from P publisher processes to N subscriber
processes: workerbus itself, or something a Python user might pick instead. The harness
(:mod:`shared.tools.bench.fanout`) owns the process layout, the start-up probe, pacing, counting
and CPU sampling; a peer only knows how to start its broker and how a publisher and a
subscriber talk to it.

Lifecycle of one run: :meth:`Peer.start` runs in the harness process and may leave objects
in ``setup.state`` (addresses, queues, locks); the worker processes are then forked, so
they inherit that state, and each calls :meth:`Peer.publisher` or :meth:`Peer.subscriber`.
"""

from __future__ import annotations

import abc
import importlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from shared.tools.bench.tally import Tally

__all__ = [
    "SOURCE",
    "BrokerHandle",
    "Peer",
    "Publisher",
    "RunSetup",
    "Subscription",
    "SyncPublisher",
    "SyncSubscription",
    "spawn",
    "wait_for_socket",
]

#: The source of every benchmark event.
SOURCE = "bench"


@dataclass
class RunSetup:
    """One run as the peer sees it."""

    workdir: str
    n_subs: int
    n_pubs: int
    #: Filled by :meth:`Peer.start`; inherited by the forked workers.
    state: dict[str, Any] = field(default_factory=dict)


@dataclass
class BrokerHandle:
    """The processes a peer started (measured for CPU and peak RSS) and how to stop them."""

    pids: list[int]
    stop: Callable[[], None]


class Publisher(Protocol):
    """An async publisher. ``publish`` may buffer; ``flush`` hands everything to the OS."""

    @property
    def publish(self) -> Callable[[str, str, Any], Awaitable[object]]: ...

    async def flush(self) -> None: ...

    async def close(self) -> None: ...


class Subscription(Protocol):
    """An async subscriber already feeding a :class:`Tally`."""

    async def run(self) -> None:
        """Return once the tally is done (every publisher's end marker arrived)."""

    async def close(self) -> None: ...


class SyncPublisher(Protocol):
    @property
    def publish(self) -> Callable[[str, str, Any], object]: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class SyncSubscription(Protocol):
    def run(self) -> None: ...

    def close(self) -> None: ...


class Peer(abc.ABC):
    """One scenario of the benchmark. Subclasses set ``is_sync`` and ``client_backend``."""

    #: True for peers whose clients are plain blocking code (no event loop).
    is_sync: bool = False
    #: anyio backend of the client processes: "asyncio", "uvloop" or "trio".
    client_backend: str = "asyncio"
    #: Scale of the flood size: slow peers get shorter floods so the suite stays short.
    events_scale: float = 1.0
    #: No broker process (e.g. shared memory): broker columns stay empty.
    has_broker: bool = True
    #: events/s of this peer's latency test when it is fixed by its target (else ``--rate``)
    lat_rate: float | None = None

    def unavailable(self) -> str | None:
        """Why this peer cannot run here (a missing package or program), or None."""
        return None

    def describe(self) -> str:
        """One line for the report: what exactly was measured."""
        doc = type(self).__doc__
        return doc.strip().splitlines()[0] if doc else ""

    @abc.abstractmethod
    def start(self, setup: RunSetup) -> BrokerHandle:
        """Start the broker (a separate process) and wait until clients can connect."""

    async def publisher(self, setup: RunSetup, index: int) -> Publisher:
        raise NotImplementedError

    async def subscriber(self, setup: RunSetup, index: int, tally: Tally) -> Subscription:
        """Connect, subscribe to every event, and return once subscribed."""
        raise NotImplementedError

    def publisher_sync(self, setup: RunSetup, index: int) -> SyncPublisher:
        raise NotImplementedError

    def subscriber_sync(self, setup: RunSetup, index: int, tally: Tally) -> SyncSubscription:
        raise NotImplementedError


def missing(module: str, package: str, extra: str) -> str | None:
    """Why a peer cannot run without ``module`` (from ``package``), or None when it imports."""
    try:
        importlib.import_module(module)
    except ImportError:
        return f"{package} is not installed (pip install 'workerbus[{extra}]')"
    return None


def spawn(argv: Sequence[str], **options: Any) -> subprocess.Popen[bytes]:
    """Start a helper process in its own session (a stray signal to us does not hit it)."""
    return subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
        **options,
    )


def stopper(proc: subprocess.Popen[bytes], grace: float = 3.0) -> Callable[[], None]:
    """Stop exactly ``proc`` (by its pid): SIGTERM, then SIGKILL after ``grace`` seconds."""

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=grace)

    return stop


def wait_for_socket(
    path: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15.0
) -> None:
    """Wait until a Unix socket at ``path`` accepts connections.

    Raises:
        RuntimeError: the broker exited, or the socket was not ready in time.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"broker exited early with status {proc.returncode}")
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                return
            except OSError:
                pass
            finally:
                probe.close()
        time.sleep(0.01)
    raise RuntimeError(f"socket {path} not ready after {timeout:g} s")
