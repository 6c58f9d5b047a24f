"""``workerbus demo --asgi``: the example ASGI app under uvicorn, events crossing workers.

Starts ``uvicorn shared.tools.asgi_app:app --workers N`` (the app of examples/asgi_app.py,
shipped in the package so that an install runs it) on a Unix socket in a temp directory
(the embedded bus socket next to it), waits until every worker answers, publishes one
event through whichever worker takes the request, and shows each worker's ``/seen``.
Needs uvicorn (the ``servers`` extra).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx

from .interrupts import deferred

__all__ = ["run_asgi_demo"]

_DEADLINE = 30.0
_MAX_REQUESTS = 2000


def _listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def _poll(http: httpx.Client, uds: str, workers: int, want: str | None) -> dict[int, dict[str, Any]]:
    """Hit /seen (a new connection each time) until every worker id answered."""
    latest: dict[int, dict[str, Any]] = {}
    end = time.monotonic() + _DEADLINE
    for _ in range(_MAX_REQUESTS):
        if time.monotonic() > end:
            break
        if not _listening(uds):
            time.sleep(0.1)
            continue
        try:
            s = http.get("/seen", params={"source": "demo"}).json()
        except (httpx.TransportError, ValueError):
            time.sleep(0.05)
            continue
        if want is None or any(e["event"] == want for e in s["events"]):
            latest[s["worker_id"]] = s
        if len(latest) >= workers:
            return latest
    raise TimeoutError(f"only workers {sorted(latest)} of {workers} answered within {_DEADLINE}s")


def run_asgi_demo(*, workers: int = 4, transport: str = "http") -> int:
    """Run the demo; returns the process exit status."""
    uvicorn = shutil.which("uvicorn", path=os.path.dirname(sys.executable)) or shutil.which("uvicorn")
    if uvicorn is None:
        print("workerbus demo --asgi: uvicorn is not installed (pip install 'workerbus[servers]')", file=sys.stderr)
        return 2
    if workers < 1:
        print("workerbus demo: --workers must be at least 1", file=sys.stderr)
        return 2
    server: subprocess.Popen[bytes] | None = None
    tmp = tempfile.mkdtemp(prefix="workerbus-asgi-")
    # (right after the directory exists: an interrupt before `try` would leave it behind)
    try:
        uds = os.path.join(tmp, "http.sock")
        env = {
            **os.environ,
            "WORKERBUS_ADDRESS": f"unix:{os.path.join(tmp, 'bus.sock')}",
            "WORKERBUS_WORKERS": str(workers),
            "WORKERBUS_TRANSPORT": transport,
        }
        print(f"workerbus demo: uvicorn shared.tools.asgi_app:app --workers {workers} (bus over {transport})")
        with deferred():  # (its own session: nobody else stops it if this does not)
            server = subprocess.Popen(
                [uvicorn, "shared.tools.asgi_app:app", "--workers", str(workers),
                 "--uds", uds, "--log-level", "warning"],
                env=env, start_new_session=True,
            )
        transport_ = httpx.HTTPTransport(uds=uds)
        with httpx.Client(transport=transport_, base_url="http://demo",
                          headers={"Connection": "close"}, timeout=5.0) as http:
            before = _poll(http, uds, workers, None)
            hosts = [s for s in before.values() if s["broker"]]
            print(f"  {len(before)} workers up; worker {hosts[0]['worker_id']} (pid {hosts[0]['pid']}) hosts the broker")
            r = http.post("/publish", json={"source": "demo", "event": "hello", "data": {"n": 1}})
            sender = r.json()
            print(f"  POST /publish went to worker {sender['worker_id']} (pid {sender['pid']})")
            after = _poll(http, uds, workers, "hello")
            for wid in sorted(after):
                s = after[wid]
                events = [f"{e['source']}/{e['event']} {e['data']} from worker {e['wid']}" for e in s["events"]]
                role = " (broker)" if s["broker"] else ""
                print(f"  worker {wid} pid {s['pid']}{role} saw: {'; '.join(events)}")
        print(f"summary: an event published through worker {sender['worker_id']} reached all {workers} workers -> OK")
        return 0
    except (TimeoutError, httpx.HTTPError) as exc:
        print(f"workerbus demo --asgi: {exc}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            _stop(server)
        shutil.rmtree(tmp, ignore_errors=True)


def _stop(server: subprocess.Popen[bytes]) -> None:
    """uvicorn and its workers (a session of their own): SIGTERM, then SIGKILL."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.wait()
