"""shared.blocking: the bus from synchronous code, with the loop in a background thread."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from shared.blocking import BlockingClient


def _wait(predicate: Any, deadline: float = 5.0) -> None:
    end = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError
        time.sleep(0.005)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_blocking_clients_publish_and_receive(address: str, backend: str) -> None:
    got: dict[int, list[tuple[str, str, Any, int | None]]] = {0: [], 1: []}
    threads: dict[int, set[str]] = {0: set(), 1: set()}
    with BlockingClient(address, workers=2, backend=backend) as a, BlockingClient(
        address, workers=2, backend=backend
    ) as b:
        for bus in (a, b):
            wid = bus.worker_id

            def handler(data: Any, event: str, source: str, sender: int | None, wid: int = wid) -> None:
                threads[wid].add(threading.current_thread().name)
                if source == "app":
                    got[wid].append((source, event, data, sender))

            bus.subscribe("*", "*", handler)
            bus.wait_ready(timeout=5)
        assert {a.worker_id, b.worker_id} == {0, 1}
        assert a.is_broker != b.is_broker
        a.publish("app", "hello", {"n": 1})
        b.publish_nowait("app", "only-a", None, f"worker:{a.worker_id}")
        b.flush(timeout=5)
        _wait(lambda: len(got[a.worker_id]) == 2 and len(got[b.worker_id]) == 1)
        assert got[b.worker_id] == [("app", "hello", {"n": 1}, a.worker_id)]
        assert sorted(e[1] for e in got[a.worker_id]) == ["hello", "only-a"]
        assert a.statistics().published == 2  # hello, plus the sync marker sent on connect
        # handlers run in the bus thread, never in ours
        assert threading.current_thread().name not in threads[a.worker_id]


def test_blocking_client_misuse_and_close(address: str) -> None:
    bus = BlockingClient(address, workers=1)
    with pytest.raises(RuntimeError):
        bus.publish("a", "b")
    bus.start()
    bus.start()  # idempotent
    with pytest.raises(ValueError):
        bus.publish("", "b")
    bus.close()
    bus.close()  # idempotent
    with pytest.raises(RuntimeError):
        bus.statistics()
