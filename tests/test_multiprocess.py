"""Broker and workers as separate OS processes over a real Unix socket."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

import pytest

from .proc import PY, JsonLinesChild, broker

pytestmark = pytest.mark.slow


class Worker(JsonLinesChild):
    """A tests/mp_worker.py process with a bounded way to read what it printed."""

    def __init__(self, address: str, transport: str, wid: int, backend: str = "asyncio") -> None:
        super().__init__([PY, "-m", "tests.mp_worker", address, transport, str(wid), backend])
        self.wid = wid
        self.events: list[list[Any]] = []

    def expect(self, key: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            if "ev" in msg:
                self.events.append(msg["ev"])
            if key in msg:
                return msg

    def wait_events(self, count: int, timeout: float = 10.0) -> list[list[Any]]:
        deadline = time.monotonic() + timeout
        while len(self.events) < count:
            self.expect("ev", timeout=max(0.01, deadline - time.monotonic()))
        return self.events

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(cmd="quit")
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()


def _close_while_the_broker_runs(workers: list[Worker]) -> None:
    """A worker's quit flushes, and a flush waits for a broker: close them before it stops
    (the fixture's close after the broker has gone would wait out each worker's 5 s)."""
    for w in workers:
        w.close()
    assert [w.proc.returncode for w in workers] == [0] * len(workers)  # quit, not killed


@pytest.fixture
def workers() -> Any:
    made: list[Worker] = []
    yield made
    for w in made:
        w.close()


@pytest.mark.parametrize("transport", ["http", "stream"])
def test_broadcast_unique_and_targets_across_processes(sock_dir: str, transport: str, workers: list[Worker]) -> None:
    path = os.path.join(sock_dir, "bus.sock")
    address = f"unix:{path}"
    with broker(path, "--workers", "4", "--unique-timeout", "30", transport=transport):
        for wid in range(4):
            workers.append(Worker(address, transport, wid, "trio" if wid % 2 else "asyncio"))
        for w in workers:
            w.expect("ready")
        for w in workers:
            w.send(cmd="publish", source="cache", event="invalidate", data={"from": w.wid})
            w.send(cmd="publish", source="router", event="rebuild", target="unique:rebuild")
            w.send(cmd="publish", source="ping", event=f"to-{(w.wid + 1) % 4}", target=f"worker:{(w.wid + 1) % 4}")
            w.send(cmd="publish", source="demo", event="done")
        for w in workers:
            # 4 broadcasts + 4 done + 1 ping (+ maybe the unique one); done is last from each.
            deadline = time.monotonic() + 15
            while sum(1 for e in w.events if e[0] == "demo") < 4:
                w.expect("ev", timeout=max(0.01, deadline - time.monotonic()))
        for w in workers:
            per_publisher: dict[int, list[str]] = {}
            for source, _event, _, wid in w.events:
                per_publisher.setdefault(wid, []).append(source)
            assert sorted(d["from"] for s, _, d, _ in w.events if s == "cache") == [0, 1, 2, 3]
            assert [e[1] for e in w.events if e[0] == "ping"] == [f"to-{w.wid}"]
            # Each publisher's events arrive in publish order.
            for wid, sources in per_publisher.items():
                expected = [s for s in ("cache", "router", "ping", "demo") if s in sources]
                assert sources == expected, (w.wid, wid, sources)
        assert sum(1 for w in workers for e in w.events if e[0] == "router") == 1
        _close_while_the_broker_runs(workers)


def test_killed_broker_loses_nothing_buffered_and_handlers_keep_running(sock_dir: str, workers: list[Worker]) -> None:
    path = os.path.join(sock_dir, "bus.sock")
    address = f"unix:{path}"
    with broker(path, "--workers", "2") as first:
        for wid in range(2):
            workers.append(Worker(address, "http", wid))
        for w in workers:
            w.expect("ready")
        workers[0].send(cmd="publish", source="s", event="before")
        for w in workers:
            w.wait_events(1)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=5)
    for i in range(3):
        workers[0].send(cmd="publish", source="s", event=f"during-{i}")
    # Local events still reach handlers while no broker exists.
    workers[1].send(cmd="publish", source="s", event="local", target="current")
    assert workers[1].wait_events(2)[-1][1] == "local"
    with broker(path, "--workers", "2"):
        for w in workers:
            names = [e[1] for e in w.wait_events(len(w.events) + 3 if w.wid == 0 else 5)]
            assert [n for n in names if n.startswith("during")] == ["during-0", "during-1", "during-2"]
        workers[0].send(cmd="stats")
        assert workers[0].expect("stats")["stats"]["reconnects"] == 1
        _close_while_the_broker_runs(workers)
