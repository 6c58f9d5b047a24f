"""The embedded bus across real processes: ``kill -9`` the worker that hosts the broker.

Each member is a tests/embed_worker.py process that joined with ``join()``; the test kills
the host, checks that the survivors move to one new broker (whose takeover holds routing
until their hellos are in: shared/broker.py ``await_reconnects``), that what they publish
afterwards reaches every other survivor in order with nothing reported lost, that a
respawned worker takes the dead one's id, and that everybody leaves politely.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from shared.election import lock_path

from .proc import PY, JsonLinesChild

pytestmark = pytest.mark.slow

WORKERS = 4
_TIMEOUT = 20.0


class Member(JsonLinesChild):
    """One embedded worker process and everything it printed."""

    def __init__(self, address: str, transport: str, backend: str) -> None:
        super().__init__([PY, "-m", "tests.embed_worker", address, str(WORKERS), transport, backend])
        self.pid = self.proc.pid
        self.seen: list[dict[str, Any]] = []

    def until(self, predicate: Callable[[list[dict[str, Any]]], bool], what: str) -> None:
        """Read lines until ``predicate(everything seen)`` holds (bounded)."""
        deadline = time.monotonic() + _TIMEOUT
        while not predicate(self.seen):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"pid {self.pid}: no {what} within {_TIMEOUT}s; seen {self.seen[-5:]}")
            try:
                self.seen.append(self.lines.get(timeout=min(left, 0.5)))
            except queue.Empty:
                continue

    def welcomes(self) -> list[dict[str, Any]]:
        return [m for m in self.seen if "welcome" in m]

    def events(self, name: str, after: int = 0) -> list[list[Any]]:
        return [m["ev"] for m in self.seen[after:] if "ev" in m and m["ev"][1] == name]

    def stats(self) -> dict[str, Any]:
        self.send(cmd="stats")
        self.until(lambda seen: "stats" in seen[-1] if seen else False, "stats")
        stats: dict[str, Any] = self.seen.pop()["stats"]
        return stats

    def close(self) -> None:
        self.kill()


@pytest.fixture
def fleet() -> Iterator[list[Member]]:
    made: list[Member] = []
    yield made
    for m in made:
        m.close()


def _host_record(path: str) -> dict[str, Any]:
    with open(lock_path(path)) as f:
        record: dict[str, Any] = json.load(f)
    return record


@pytest.mark.parametrize(("transport", "backend"), [("http", "asyncio"), ("stream", "trio")])
def test_kill_9_of_the_host_survivors_move_over_and_nothing_is_lost(
    sock_dir: str, transport: str, backend: str, fleet: list[Member]
) -> None:
    path = os.path.join(sock_dir, "bus.sock")
    address = f"unix:{path}"
    fleet.extend(Member(address, transport, backend) for _ in range(WORKERS))
    for m in fleet:
        m.until(lambda seen: any("welcome" in x for x in seen), "first welcome")
    # Everybody on the one broker of the lock record (a worker started early may have
    # been welcomed before the others joined, but there is only ever one host).
    record = _host_record(path)
    generation = record["generation"]
    for m in fleet:
        m.until(lambda seen: any(x.get("welcome") == generation for x in seen), "welcome of the host")
    (host,) = [m for m in fleet if m.pid == record["pid"]]
    wids = {m.welcomes()[-1]["wid"] for m in fleet}
    assert wids == set(range(WORKERS))

    for m in fleet:
        m.send(cmd="publish", source="t", event="before", data=m.welcomes()[-1]["wid"], target="others")
    for m in fleet:
        m.until(lambda seen: sum(1 for x in seen if x.get("ev", [0, 0])[1] == "before") == WORKERS - 1, "before")

    os.kill(host.pid, signal.SIGKILL)
    host.proc.wait(timeout=_TIMEOUT)
    survivors = [m for m in fleet if m is not host]
    for m in survivors:
        m.until(lambda seen: any(x.get("welcome", 0) > generation for x in seen), "welcome of a new broker")
    news = [m.welcomes()[-1] for m in survivors]
    assert len({w["welcome"] for w in news}) == 1, news  # one new broker
    assert sum(w["host"] for w in news) == 1, news  # hosted by one of the survivors
    # where each survivor's welcome from the new broker is in what it printed
    marks = [max(i for i, x in enumerate(m.seen) if x.get("welcome", 0) > generation) for m in survivors]

    # What the survivors publish now reaches every other survivor, in each one's order.
    for m in survivors:
        wid = m.welcomes()[-1]["wid"]
        for i in range(5):
            m.send(cmd="publish", source="t", event="after", data=[wid, i], target="others")
    survivor_wids = {m.welcomes()[-1]["wid"] for m in survivors}
    for m, mark in zip(survivors, marks, strict=True):
        m.until(lambda seen: len([x for x in seen if x.get("ev", [0, 0])[1] == "after"]) == 5 * (WORKERS - 2), "after")
        got: dict[int, list[int]] = {}
        for _, _, (wid, i), _ in m.events("after"):
            got.setdefault(wid, []).append(i)
        assert got == {w: list(range(5)) for w in survivor_wids - {m.welcomes()[-1]["wid"]}}
        # the new broker told each survivor who is there (held during the takeover, sent
        # together once the hellos were in)
        joined = {d["worker_id"] for _, _, d, _ in m.events("joined", after=mark)}
        assert survivor_wids <= joined, (joined, survivor_wids)
        stats = m.stats()
        assert stats["lost"] == 0, stats
        assert stats["moves"] == 1, stats

    # The server respawns the dead worker: it takes the freed id and joins the new broker.
    again = Member(address, transport, backend)
    fleet.append(again)
    again.until(lambda seen: any("welcome" in x for x in seen), "the respawned worker's welcome")
    assert again.welcomes()[-1]["wid"] == host.welcomes()[-1]["wid"]
    assert again.welcomes()[-1]["welcome"] == news[0]["welcome"]

    # Everybody leaves politely, each flushing what it published: the others first, then
    # the host (a flush waits for the broker's confirmation, which a host that is leaving
    # at the same moment may not give).
    leaving = sorted(survivors + [again], key=lambda m: m.welcomes()[-1]["host"])
    for m in leaving[:-1]:
        m.send(cmd="quit")
    for m in leaving[:-1]:
        assert m.proc.wait(timeout=_TIMEOUT) == 0
    leaving[-1].send(cmd="quit")
    assert leaving[-1].proc.wait(timeout=_TIMEOUT) == 0


def test_the_failover_benchmark_accounts_for_every_event(tmp_path: Any) -> None:
    # benchmarks/failover.py end to end, small: the kills happen, every phase is timed,
    # nothing published while disconnected is lost, and whatever died with a broker was
    # reported lost by its receivers.
    out = os.path.join(str(tmp_path), "failover.json")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [PY, "-m", "benchmarks.failover", "--workers", "4", "--kills", "3", "--warmup", "0.1", "--json", out],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    with open(out) as f:
        (res,) = json.load(f)["results"]
    assert res["kills"] == 3
    assert res["events_expected"] > 0
    assert res["gap_events_lost"] == 0
    assert res["lost_reported"] == res["lost_in_dead_broker"]
    for phase in ("detect", "lock", "listening", "welcomed", "welcomed_last", "flowing_last"):
        assert res["phases_ms"][phase]["max"] >= res["phases_ms"][phase]["median"] >= 0
    assert 0 <= res["background_pct"] <= 100
    assert "last survivor welcomed = failover" in done.stdout
