"""examples/wsgi_app.py (Flask) on gunicorn sync workers, driven over HTTP with httpx."""

from __future__ import annotations

import pytest

from tests.servers import has_event, kill_broker_host_and_check, running
from tests.test_integration_asgi import _tool

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

WORKERS = 3


def test_gunicorn_sync_workers_share_events_and_survive_a_killed_broker_host() -> None:
    pytest.importorskip("flask")

    def argv(uds: str) -> list[str]:
        return [_tool("gunicorn"), "-w", str(WORKERS), "--bind", f"unix:{uds}",
                "--log-level", "warning", "examples.wsgi_app:app"]

    with running(argv, {"WORKERBUS_WORKERS": str(WORKERS)}) as (server, _):
        # The bus starts on a worker's first request: wake every worker up first.
        server.poll_workers(WORKERS)
        kill_broker_host_and_check(server, WORKERS)
        server.publish("test", "to-two", None, "worker:2")
        got = server.poll_workers(WORKERS, source="test")
        assert [w for w, s in got.items() if has_event("to-two")(s)] == [2]
