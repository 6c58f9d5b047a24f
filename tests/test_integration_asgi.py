"""examples/asgi_app.py under real servers: uvicorn, gunicorn + UvicornWorker, hypercorn.

Each test starts the server as a subprocess on a Unix socket and drives it with httpx.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests.servers import BIN, has_event, kill_broker_host_and_check, running

pytestmark = [
    pytest.mark.slow,
    # httpcore leaks the socket of a Unix connect that fails while a worker restarts
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

WORKERS = 4


def _tool(name: str) -> str:
    path = os.path.join(BIN, name)
    if not os.path.exists(path):
        found = shutil.which(name)
        if found is None:
            pytest.fail(f"{name} is not installed (pip install -e '.[servers]')")
        return found
    return path


def test_uvicorn_workers_share_events_and_survive_a_killed_broker_host() -> None:
    def argv(uds: str) -> list[str]:
        return [_tool("uvicorn"), "examples.asgi_app:app", "--workers", str(WORKERS),
                "--uds", uds, "--log-level", "warning"]

    with running(argv, {"WORKERBUS_WORKERS": str(WORKERS)}) as (server, _):
        kill_broker_host_and_check(server, WORKERS)


def test_gunicorn_uvicorn_workers_share_events_and_survive_a_killed_broker_host() -> None:
    def argv(uds: str) -> list[str]:
        return [_tool("gunicorn"), "-k", "uvicorn.workers.UvicornWorker", "-w", str(WORKERS),
                "--bind", f"unix:{uds}", "--log-level", "warning", "examples.asgi_app:app"]

    # No WORKERBUS_WORKERS here: the app reads the WEB_CONCURRENCY hint, ids are lowest-free.
    with running(argv, {"WEB_CONCURRENCY": str(WORKERS)}) as (server, _):
        kill_broker_host_and_check(server, WORKERS)


@pytest.mark.parametrize("worker_class", ["asyncio", "trio"])
def test_hypercorn_workers_share_events(worker_class: str) -> None:
    workers = 3

    def argv(uds: str) -> list[str]:
        return [_tool("hypercorn"), "--workers", str(workers), "--worker-class", worker_class,
                "--bind", f"unix:{uds}", "examples.asgi_app:app"]

    with running(argv, {"WORKERBUS_WORKERS": str(workers)}) as (server, _):
        first = server.poll_workers(workers)
        assert sorted(first) == list(range(workers))
        assert sum(s["broker"] for s in first.values()) == 1
        done = server.publish("test", "hello", {"via": worker_class})
        got = server.poll_workers(workers, has_event("hello"), source="test")
        for s in got.values():
            (ev,) = [e for e in s["events"] if e["event"] == "hello"]
            assert ev == {"source": "test", "event": "hello", "data": {"via": worker_class},
                          "wid": done["worker_id"], "node": None}
        # targets reach exactly who they name
        server.publish("test", "only-one", None, "worker:1")
        server.poll_workers(1, has_event("only-one"), source="test")
        others = server.poll_workers(workers, source="test")
        assert [w for w, s in others.items() if has_event("only-one")(s)] == [1]
