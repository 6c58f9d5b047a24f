"""Run real servers as subprocesses and talk to their workers over HTTP (httpx).

Every server runs in its own session (process group), so stopping it reaches the workers
its master spawned too. Every wait is bounded by a count and a deadline.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)

Seen = dict[str, Any]


class Server:
    """A server subprocess (its own process group) plus an HTTP client for its socket."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], uds: str, log: str) -> None:
        self.uds = uds
        self.log_path = log
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                list(argv), cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # A fresh connection per request ("Connection: close"), so the kernel hands the
        # requests out to different workers.
        self.http = httpx.Client(
            transport=httpx.HTTPTransport(uds=uds),
            base_url="http://workers",
            headers={"Connection": "close"},
            timeout=5.0,
        )

    def _listening(self) -> bool:
        # httpcore does not close the socket of a failed Unix connect (a ResourceWarning
        # later); probe with our own socket first.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(self.uds)
            except OSError:
                return False
        return True

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]

    def stop(self) -> None:
        self.http.close()
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        # Whatever is left of the group (a worker that ignored SIGTERM) goes now.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=5)

    def seen(self, source: str | None = None) -> Seen | None:
        """One /seen answer from whichever worker takes the connection; None if refused."""
        if not self._listening():
            return None
        try:
            r = self.http.get("/seen", params={} if source is None else {"source": source})
        except httpx.TransportError:
            return None
        return r.json() if r.status_code == 200 else None

    def publish(
        self, source: str, event: str, data: Any = None, target: str = "all", scope: str = "local"
    ) -> Seen:
        r = self.http.post(
            "/publish",
            json={"source": source, "event": event, "data": data, "target": target, "scope": scope},
        )
        r.raise_for_status()
        result: Seen = r.json()
        return result

    def poll_workers(
        self,
        count: int,
        ok: Callable[[Seen], bool] = lambda s: True,
        *,
        source: str | None = None,
        deadline: float = 60.0,
        max_requests: int = 3000,
        exclude_pids: frozenset[int] = frozenset(),
    ) -> dict[int, Seen]:
        """Hit /seen until ``count`` distinct worker ids answered with ``ok`` true.

        Keeps the latest answer per worker id (a respawned worker replaces the dead one's).
        """
        latest: dict[int, Seen] = {}
        start = time.monotonic()
        end = start + deadline
        for _ in range(max_requests):
            if time.monotonic() > end:
                break
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            s = self.seen(source)
            if s is None or s["pid"] in exclude_pids:
                time.sleep(0.05)
                continue
            latest[s["worker_id"]] = s
            good = {w: v for w, v in latest.items() if ok(v) and v["pid"] not in exclude_pids}
            if len(good) >= count:
                return good
            # Paced, so the deadline is what bounds the wait: unpaced, 3000 requests took
            # 3 s, less than a respawned worker needs to start on a busy machine (5-6 s
            # measured with two servers on 2 cores), and the requests slowed it further.
            time.sleep(0.02)
        answers = {w: {k: v[k] for k in ("pid", "broker", "generation", "lost")} for w, v in latest.items()}
        raise AssertionError(
            f"only {sorted((w, v['pid']) for w, v in latest.items() if ok(v))} of {count} workers "
            f"answered as wanted within {time.monotonic() - start:.1f}s (deadline {deadline}s, "
            f"at most {max_requests} requests); their last answers: {answers}; server log:\n{self.log()}"
        )


@contextmanager
def running(argv_for: Callable[[str], Sequence[str]], env: Mapping[str, str] | None = None) -> Iterator[tuple[Server, str]]:
    """Start a server whose HTTP socket and bus socket live in a fresh temp directory.

    ``argv_for(uds)`` builds the command line. Yields the server and the bus address.
    """
    tmp = tempfile.mkdtemp(prefix="wb-srv-")
    uds = os.path.join(tmp, "http.sock")
    address = f"unix:{os.path.join(tmp, 'bus.sock')}"
    server = Server(
        argv_for(uds), {"WORKERBUS_ADDRESS": address, **(env or {})}, uds, os.path.join(tmp, "log")
    )
    try:
        yield server, address
    finally:
        server.stop()
        subprocess.run(["rm", "-rf", tmp], check=False)


def has_event(name: str) -> Callable[[Seen], bool]:
    return lambda s: any(e["event"] == name for e in s["events"])


def kill_broker_host_and_check(server: Server, workers: int) -> None:
    """The whole failover story against a server that respawns dead workers."""
    # Connected, not only started: a worker answers /seen before its first welcome, and
    # the host's generation is what the failover is judged against.
    first = server.poll_workers(workers, lambda s: s["generation"] is not None)
    assert sorted(first) == list(range(workers))
    hosts = [s for s in first.values() if s["broker"]]
    assert len(hosts) == 1, first
    server.publish("test", "before", {"n": 1})
    server.poll_workers(workers, has_event("before"), source="test")

    old = hosts[0]
    os.kill(old["pid"], signal.SIGKILL)
    dead = frozenset({old["pid"]})
    # Every worker id answers again, none from the dead pid, and one new host.
    after = server.poll_workers(
        workers, lambda s: s["generation"] is not None and s["generation"] > old["generation"],
        exclude_pids=dead,
    )
    new_hosts = [s for s in after.values() if s["broker"]]
    assert len(new_hosts) == 1, after
    assert new_hosts[0]["pid"] != old["pid"]
    assert old["worker_id"] in after  # the respawned worker took the dead one's id

    server.publish("test", "after", {"n": 2})
    got = server.poll_workers(workers, has_event("after"), source="test", exclude_pids=dead)
    assert sorted(got) == list(range(workers))
