"""Real engines and real nodes for the cluster tests: nats-server, redis-server, brokers
with a bridge, and worker processes (tests/cluster_worker.py), all bounded and cleaned up."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from shared.tools.statsserver import fetch_stats

from .proc import PY, stop, wait_for_socket, workerbus

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"engine exited with {proc.returncode} before listening")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


class Engine:
    """One engine server process that can be killed and restarted on the same address."""

    def __init__(
        self, kind: str, workdir: str, *, routes: list[int] | None = None,
        cluster_port: int | None = None, js: bool = True, extra: tuple[str, ...] = (),
    ) -> None:
        self.kind = kind
        self.js = js
        self.extra = extra  # more arguments for the server
        self.workdir = workdir
        self.port = free_port()
        self.routes = routes or []
        self.cluster_port = cluster_port
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock = os.path.join(workdir, "redis.sock")

    @property
    def url(self) -> str:
        if self.kind == "nats":
            return f"nats://127.0.0.1:{self.port}"
        return f"redis+unix://{self.sock}"

    def start(self) -> None:
        log = open(os.path.join(self.workdir, f"{self.kind}-{self.port}.log"), "ab")
        if self.kind == "nats":
            cmd = ["nats-server", "-a", "127.0.0.1", "-p", str(self.port)]
            if self.js:
                cmd += ["-js", "-sd", os.path.join(self.workdir, "js")]
            cmd += self.extra
            if self.cluster_port is not None:
                cmd += ["--cluster", f"nats://127.0.0.1:{self.cluster_port}", "--cluster_name", "wbtest"]
                cmd += ["-n", f"n{self.port}"]
                if self.routes:
                    cmd += ["--routes", ",".join(f"nats://127.0.0.1:{p}" for p in self.routes)]
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=self.workdir)
            log.close()
            wait_port(self.port, self.proc)
        else:
            cmd = ["redis-server", "--port", "0", "--unixsocket", self.sock, "--unixsocketperm", "700",
                   "--save", "", "--appendonly", "no", "--dir", self.workdir, *self.extra]
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=self.workdir)
            log.close()
            wait_for_socket(self.sock, None)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


class Lines:
    """A process's stdout as JSON lines, collected by a thread."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.items: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            item = json.loads(raw)
            with self.cond:
                self.items.append(item)
                self.cond.notify_all()

    def wait(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 20.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate(self.items):
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None and not self.thread.is_alive():
                    raise TimeoutError(f"condition not met; {len(self.items)} lines so far")
                self.cond.wait(min(left, 0.5))
            return list(self.items)

    def events(self) -> list[dict[str, Any]]:
        with self.cond:
            return [i for i in self.items if "source" in i]


class Worker:
    def __init__(self, node: Node, worker_id: int) -> None:
        self.node = node
        self.worker_id = worker_id
        self.proc = subprocess.Popen(
            [PY, os.path.join(HERE, "cluster_worker.py"), node.address, str(worker_id)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": ROOT},
        )
        self.lines = Lines(self.proc)

    def command(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()

    def publish(self, event: str, n: int, **kw: Any) -> None:
        self.command(op="publish", event=event, n=n, **kw)
        self.lines.wait(lambda items: any(i.get("published") is not None and i.get("event") == event for i in items))

    def received(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.lines.events() if e["event"] == event]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.command(op="exit")
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        stop(self.proc)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


class Node:
    """A broker process with a bridge, and its workers."""

    def __init__(
        self, name: str, workdir: str, url: str, backend: str, *, extra: tuple[str, ...] = (),
        wrap: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.address = f"unix:{os.path.join(workdir, name + '.sock')}"
        self.stats_address = f"unix:{os.path.join(workdir, name + '.stats')}"
        self.log = open(os.path.join(workdir, name + ".log"), "ab")
        self.proc = subprocess.Popen(
            # (wrap: e.g. ``ip netns exec NS`` to run the broker in a network namespace)
            [*wrap, *workerbus("broker", "--listen", self.address, "--transport", "stream", "--bridge", url,
                      "--node", name, "--stats-listen", self.stats_address, "--backend", backend,
                      "--unique-timeout", "30", *extra)],
            stdout=self.log, stderr=self.log, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
        )
        wait_for_socket(self.address[5:], self.proc)
        wait_for_socket(self.stats_address[5:], self.proc)
        self.workers: list[Worker] = []

    def stats(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(fetch_stats(self.stats_address, as_json=True, timeout=5))
        return doc

    def bridge(self) -> dict[str, Any]:
        doc: dict[str, Any] = self.stats()["bridge"]
        return doc

    def wait_bridge(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            b = self.bridge()
            if predicate(b):
                return b
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise TimeoutError(f"node {self.name}: bridge never met the condition: {b}")
            time.sleep(0.02)

    def start_workers(self, count: int) -> list[Worker]:
        new = [Worker(self, len(self.workers) + i) for i in range(count)]
        self.workers += new
        for w in new:
            w.lines.wait(lambda items: any(i.get("ready") for i in items))
        return new

    def close(self) -> None:
        for w in self.workers:
            w.close()
        stop(self.proc)
        self.log.close()


@contextmanager
def cluster_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="wbc-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def engine(kind: str, workdir: str, **kw: Any) -> Iterator[Engine]:
    e = Engine(kind, workdir, **kw)
    e.start()
    try:
        yield e
    finally:
        e.kill()


@contextmanager
def nodes(workdir: str, urls: list[str], backend: str, **kw: Any) -> Iterator[list[Node]]:
    with ExitStack() as stack:
        made = []
        for i, url in enumerate(urls):
            n = Node(f"node{i}", workdir, url, backend, **kw)
            stack.callback(n.close)
            made.append(n)
        for n in made:
            n.wait_bridge(lambda b: b["engine_connected"])
        yield made


__all__ = ["Engine", "Node", "Worker", "cluster_dir", "engine", "nodes", "signal"]
