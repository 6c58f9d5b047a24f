"""The cluster scope is negotiated (docs/protocol.md §8, docs/cluster.md): the client asks
for the ``cluster`` capability, the broker accepts the scope only from clients it granted.

Real processes and sockets: a workerbus broker (grants it), the conformance kit's strict
``serve`` broker (knows only ``welcome`` and ``barrier``: what a broker older than the cluster
scope looks like), and raw sockets for a client that never asked.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
from contextlib import AbstractContextManager

import anyio
import msgpack
import pytest

from shared.client import Client
from shared.errors import ScopeNotGranted
from shared.messages import CAP_CLUSTER

from .proc import broker, running, wait_for_socket, workerbus


def _frame(obj: object) -> bytes:
    payload: bytes = msgpack.packb(obj, use_bin_type=True)
    return len(payload).to_bytes(2, "big") + payload


def _old_broker(sock_dir: str) -> tuple[str, AbstractContextManager[subprocess.Popen[bytes]]]:
    path = os.path.join(sock_dir, "old.sock")
    cmd = [sys.executable, "-m", "shared.tools.conformance", "serve", f"unix:{path}", "--transport", "stream"]
    return path, running(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.anyio
async def test_the_broker_grants_cluster_and_the_scope_works(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "bus.sock")
    with broker(path, transport="stream"):
        async with Client(f"unix:{path}", transport="stream", worker_id=1) as bus:
            with anyio.fail_after(10):
                await bus.wait_ready()
                assert bus.welcome is not None and CAP_CLUSTER in bus.welcome.caps
                got: list[str] = []
                arrived = anyio.Event()

                def handler(data: object, event: str, source: str, wid: object) -> None:
                    got.append(event)
                    arrived.set()

                bus.subscribe("s", "*", handler)
                # No bridge: a one-node cluster, so the event comes back here.
                await bus.publish("s", "clustered", None, "all", scope="cluster")
                await bus.flush()
                await arrived.wait()
            assert got == ["clustered"]


@pytest.mark.anyio
async def test_a_broker_that_does_not_grant_it_gets_no_scoped_publish(sock_dir: str) -> None:
    path, serve = _old_broker(sock_dir)
    with serve as proc:
        wait_for_socket(path, proc)
        async with Client(f"unix:{path}", transport="stream", worker_id=1) as bus:
            with anyio.fail_after(10):
                await bus.wait_ready()
            assert bus.welcome is not None and CAP_CLUSTER not in bus.welcome.caps
            with pytest.raises(ScopeNotGranted, match="did not grant the 'cluster' capability"):
                await bus.publish("s", "e", None, "all", scope="cluster")
            with pytest.raises(ScopeNotGranted):
                bus.publish_nowait("s", "e", None, "others", scope="cluster")
            await bus.publish("s", "local", None)  # the host-local bus is unaffected
            with anyio.fail_after(10):
                await bus.flush()
            assert bus.statistics().dropped == 0


def test_publish_command_says_the_broker_refused_the_scope(sock_dir: str) -> None:
    path, serve = _old_broker(sock_dir)
    with serve as proc:
        wait_for_socket(path, proc)
        out = subprocess.run(
            workerbus("publish", f"unix:{path}", "s", "e", "--scope", "cluster", "--transport", "stream",
                      "--timeout", "10"),
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "did not grant the 'cluster' capability" in lines[0], out.stderr


@pytest.mark.parametrize("caps", [None, ["welcome", "barrier"]])
def test_the_broker_refuses_the_scope_from_a_client_that_did_not_ask(sock_dir: str, caps: list[str] | None) -> None:
    path = os.path.join(sock_dir, "bus.sock")
    with broker(path, transport="stream") as proc:
        listener = socket.socket(socket.AF_UNIX)
        listener.settimeout(10)
        listener.connect(path)
        hello: dict[str, object] = {"id": 1, "pid": os.getpid()}
        if caps is not None:
            hello["caps"] = caps
        inner = msgpack.packb({"source": "s", "event": "e", "wid": 1}, use_bin_type=True)
        listener.sendall(_frame(hello) + _frame({"spec": {"scope": "cluster"}, "data": inner}))
        # The broker closes the connection (after a welcome, when one was asked for).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not listener.recv(65536):
                break
        else:
            pytest.fail("the broker kept the connection open")
        listener.close()
        stop_at = time.monotonic() + 10
        err = b""
        assert proc.stderr is not None
        os.set_blocking(proc.stderr.fileno(), False)
        while b"'cluster' capability" not in err and time.monotonic() < stop_at:
            select.select([proc.stderr], [], [], max(0.0, stop_at - time.monotonic()))
            err += proc.stderr.read() or b""
        assert b"without the 'cluster' capability in the hello" in err, err
