"""Two "hosts" of examples/asgi_app.py under ``uvicorn --workers 4`` (two socket
directories on this machine) joined through a real nats-server by WORKERBUS_BRIDGE alone:
cluster events cross, host-local ones do not, and the bridge moves with the embedded
broker when its host is killed."""

from __future__ import annotations

import os
import shutil
import signal
from contextlib import ExitStack

import pytest

from tests.cluster_kit import cluster_dir, engine
from tests.servers import Seen, Server, has_event, running
from tests.test_integration_asgi import _tool

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.skipif(not shutil.which("nats-server"), reason="needs nats-server (scripts/setup.sh)"),
]

WORKERS = 4


def _from(node: str | None, event: str):  # type: ignore[no-untyped-def]
    return lambda s: any(e["event"] == event and e["node"] == node for e in s["events"])


def _first_crossing(src: Server, dst: Server, event: str, attempts: int = 40) -> None:
    # A freshly started (or moved) bridge subscribes asynchronously: publish until one
    # event crosses (bounded), after which everything published does.
    for attempt in range(attempts):
        src.publish("test", event, {"attempt": attempt}, scope="cluster")
        try:
            dst.poll_workers(1, has_event(event), source="test", deadline=0.5, max_requests=20)
            return
        except AssertionError:
            continue
    raise AssertionError(f"no {event} event crossed in {attempts} attempts")


def test_two_uvicorn_hosts_exchange_cluster_events() -> None:
    def argv(uds: str) -> list[str]:
        return [_tool("uvicorn"), "examples.asgi_app:app", "--workers", str(WORKERS),
                "--uds", uds, "--log-level", "warning"]

    with cluster_dir() as workdir, engine("nats", workdir) as eng, ExitStack() as stack:
        hosts = []
        for name in ("hostA", "hostB"):
            env = {"WORKERBUS_WORKERS": str(WORKERS), "WORKERBUS_BRIDGE": eng.url, "WORKERBUS_NODE": name}
            server, _ = stack.enter_context(running(argv, env))
            hosts.append(server)
        a, b = hosts
        for h in hosts:
            assert sorted(h.poll_workers(WORKERS)) == list(range(WORKERS))
        _first_crossing(a, b, "probe-ab")
        _first_crossing(b, a, "probe-ba")

        a.publish("test", "local-only", {"n": 0})
        a.publish("test", "everywhere", {"n": 1}, scope="cluster")
        b.poll_workers(WORKERS, _from("hostA", "everywhere"), source="test")
        a.poll_workers(WORKERS, _from(None, "everywhere"), source="test")
        a.poll_workers(WORKERS, _from(None, "local-only"), source="test")
        # one order per publisher: "everywhere" followed "local-only" through the same bridge
        for s in b.poll_workers(WORKERS, source="test").values():
            assert not has_event("local-only")(s)

        # the broker host of A dies; uvicorn respawns the worker; another one hosts the
        # broker, and the bridge with it
        first = a.poll_workers(WORKERS, lambda s: s["generation"] is not None)
        (old,) = [s for s in first.values() if s["broker"]]
        os.kill(old["pid"], signal.SIGKILL)
        dead = frozenset({old["pid"]})
        a.poll_workers(
            WORKERS, lambda s: s["generation"] is not None and s["generation"] > old["generation"],
            exclude_pids=dead,
        )
        _first_crossing(b, a, "probe-after-kill")
        b.publish("test", "after-kill", {"n": 2}, scope="cluster")
        got: dict[int, Seen] = a.poll_workers(WORKERS, _from("hostB", "after-kill"), source="test", exclude_pids=dead)
        assert sorted(got) == list(range(WORKERS))
        a.publish("test", "from-new-host", {"n": 3}, scope="cluster")
        b.poll_workers(WORKERS, _from("hostA", "from-new-host"), source="test")
