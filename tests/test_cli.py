"""The ``workerbus`` command as a user runs it: real processes, real signals."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess

import httpx
import pytest

from .proc import broker, running, stop, wait_for_socket, workerbus

pytestmark = pytest.mark.slow


@pytest.fixture(params=["http", "stream"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_broker_socket_rules_ready_line_and_clean_stop(sock_dir: str, transport: str) -> None:
    path = os.path.join(sock_dir, "bus.sock")
    with broker(path, transport=transport) as proc:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        # A second broker on a live path is refused, and leaves the first one alone.
        second = subprocess.run(
            workerbus("broker", "--listen", f"unix:{path}", "--transport", transport),
            capture_output=True, timeout=20,
        )
        assert second.returncode != 0
        assert b"already listening" in second.stderr
        wait_for_socket(path, proc)
        assert stop(proc, signal.SIGTERM) == 0
        assert proc.stderr is not None
        log = proc.stderr.read().decode()
    assert "ready on unix:" in log.splitlines()[0]
    assert not os.path.exists(path)


def test_stale_socket_file_is_replaced(sock_dir: str) -> None:
    import socket

    path = os.path.join(sock_dir, "bus.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    with broker(path) as proc:
        wait_for_socket(path, proc)
        assert stop(proc, signal.SIGINT) == 0


def test_publish_and_tail(sock_dir: str, transport: str) -> None:
    path = os.path.join(sock_dir, "bus.sock")
    address = f"unix:{path}"
    # --workers 1 pre-creates worker 0's queue, so nothing is missed while the tail starts.
    with broker(path, "--workers", "1", transport=transport):
        tail_cmd = workerbus("tail", address, "--transport", transport, "--count", "3", "--id", "0")
        with running(tail_cmd, stdout=subprocess.PIPE) as tail:
            for target, data in (("all", '{"k": [1, 2]}'), ("worker:0", '"direct"'), ("unique:x", None)):
                args = ["publish", address, "src", "evt", "--transport", transport, "--target", target]
                if data is not None:
                    args.insert(4, data)
                done = subprocess.run(workerbus(*args), capture_output=True, timeout=20)
                assert done.returncode == 0, done.stderr
            out, _ = tail.communicate(timeout=20)
    lines = [json.loads(line) for line in out.decode().splitlines()]
    # publish's default id is derived from its pid (-(pid * 100 + k)), so it never
    # replaces another client.
    wid = lines[0].pop("wid")
    assert lines[0] == {"source": "src", "event": "evt", "data": {"k": [1, 2]}}
    assert wid <= -100
    assert lines[1]["data"] == "direct"
    assert lines[2]["data"] is None and lines[2]["wid"] <= -100


def test_publish_errors_are_clear(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "bus.sock")
    r = subprocess.run(workerbus("publish", f"unix:{path}", "s", "e", "{not json"), capture_output=True, timeout=20)
    assert r.returncode == 2 and b"not valid JSON" in r.stderr
    r = subprocess.run(
        workerbus("publish", f"unix:{path}", "s", "e", "--timeout", "0.3"), capture_output=True, timeout=20
    )
    assert r.returncode == 1 and b"no broker reachable" in r.stderr
    r = subprocess.run(workerbus("publish", "/no/prefix", "s", "e"), capture_output=True, timeout=20)
    assert r.returncode == 2 and b"unix:" in r.stderr  # refused while parsing the arguments
    with broker(path):
        big = json.dumps("x" * 70000)
        r = subprocess.run(workerbus("publish", f"unix:{path}", "s", "e", big), capture_output=True, timeout=20)
        assert r.returncode == 1 and b"max_payload_len" in r.stderr


def test_plain_http_request_gets_a_clear_error(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "bus.sock")
    with broker(path):
        with httpx.Client(transport=httpx.HTTPTransport(uds=path), timeout=5) as client:
            r = client.get("http://localhost/")
            assert r.status_code == 426
            assert r.headers["upgrade"] == "Kong-Worker-Events/1"
            assert "Upgrade" in r.text
            r = client.post("http://localhost/", content=b"x")
            assert r.status_code == 405 and r.text.strip()


def test_demo_runs_and_checks_itself(transport: str) -> None:
    r = subprocess.run(workerbus("demo", "--workers", "3", "--transport", transport), capture_output=True, timeout=60)
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    assert "-> OK" in out and "22 deliveries (22 expected), 0 dropped" in out
