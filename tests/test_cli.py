"""The ``workerbus`` command as a user runs it: real processes, real signals."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

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


def _connections(stats: str) -> int:
    from shared.tools.statsserver import fetch_stats

    return int(json.loads(fetch_stats(f"unix:{stats}", as_json=True))["connections"])


def _wait_connections(stats: str, n: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while _connections(stats) != n:
        assert time.monotonic() < deadline, f"not {n} connections within {timeout}s"
        time.sleep(0.05)


def test_two_tails_at_once_each_print_every_event(sock_dir: str) -> None:
    """Each tail takes an id of its own (derived from its pid, as publish does): two at
    once used to share -1 and take each other's place, splitting the events."""
    path, stats = os.path.join(sock_dir, "bus.sock"), os.path.join(sock_dir, "stats.sock")
    address = f"unix:{path}"
    with broker(path, "--stats-listen", f"unix:{stats}", "--log-level", "WARNING") as proc:
        wait_for_socket(stats, proc)
        tail = workerbus("tail", address, "--count", "3", "--timeout", "30")
        with running(tail, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as one, \
                running(tail, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as two:
            _wait_connections(stats, 2)
            for i in range(3):
                done = subprocess.run(workerbus("publish", address, "s", "e", str(i)), capture_output=True, timeout=20)
                assert done.returncode == 0, done.stderr
            outs = [t.communicate(timeout=30) for t in (one, two)]
            codes = [one.returncode, two.returncode]
        assert stop(proc, signal.SIGTERM) == 0
        assert proc.stderr is not None
        log = proc.stderr.read().decode()
    assert codes == [0, 0], outs
    for out, err in outs:
        assert [json.loads(line)["data"] for line in out.decode().splitlines()] == [0, 1, 2]
        assert err == b""
    assert log == ""  # nothing at WARNING: no "replaces the connection of worker -1"


def test_tail_into_a_reader_that_stops_ends_quietly(sock_dir: str) -> None:
    """``workerbus tail ... | head -1``: the reader goes away; the tail ends with 141 (as a
    shell tool killed by SIGPIPE), not a BrokenPipeError traceback."""
    path, stats = os.path.join(sock_dir, "bus.sock"), os.path.join(sock_dir, "stats.sock")
    address = f"unix:{path}"
    with broker(path, "--stats-listen", f"unix:{stats}") as proc:
        wait_for_socket(stats, proc)
        with running(workerbus("tail", address), stdout=subprocess.PIPE, stderr=subprocess.PIPE) as tail:
            _wait_connections(stats, 1)
            assert tail.stdout is not None and tail.stderr is not None
            subprocess.run(workerbus("publish", address, "s", "e", "1"), check=True, capture_output=True, timeout=20)
            assert json.loads(tail.stdout.readline())["data"] == 1
            tail.stdout.close()
            for i in range(2, 50):  # until a write finds the pipe closed (the first may not)
                subprocess.run(workerbus("publish", address, "s", "e", str(i)), check=True, capture_output=True, timeout=20)
                try:
                    tail.wait(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    pass
            assert tail.wait(timeout=10) == 141
            assert tail.stderr.read() == b""


def test_tail_errors_are_one_line(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "bus.sock")
    with broker(path, transport="http"):
        r = subprocess.run(workerbus("tail", f"unix:{path}", "--transport", "stream", "--timeout", "10"),
                           capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.splitlines()[-1].startswith("workerbus tail: no welcome"), r.stderr
    assert "use transport 'http'" in r.stderr


def test_a_second_signal_while_the_broker_stops_is_ignored(sock_dir: str) -> None:
    """Ctrl-C twice, or `timeout` signalling the whole group: the stop still ends cleanly
    (the second signal used to raise KeyboardInterrupt inside the orderly stop)."""
    path = os.path.join(sock_dir, "bus.sock")
    with broker(path) as proc:
        subprocess.run(workerbus("publish", f"unix:{path}", "s", "e"), check=True, capture_output=True, timeout=20)
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert proc.stderr is not None
        log = proc.stderr.read().decode()
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
    assert "broker stopped" in log
    assert not os.path.exists(path)


def _demo_processes(pgid: int) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(pid)) == pgid:
                found.append(pid)
        except ProcessLookupError:
            pass
    return found


@pytest.mark.parametrize("how", ["SIGTERM to the demo", "Ctrl-C to its group"])
def test_a_stopped_demo_leaves_no_process_behind(how: str) -> None:
    with subprocess.Popen(workerbus("demo", "--workers", "4"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          start_new_session=True, text=True) as demo:
        code, err, first = _stop_demo(demo, how)
    # nor its socket's directory: "... over http (unix:/tmp/workerbus-demo-XXXX/bus.sock)"
    directory = os.path.dirname(first.rsplit("(unix:", 1)[1].rstrip(")\n"))
    assert "workerbus-demo-" in directory and not os.path.exists(directory)
    # (a demo that finished before the signal is fine too; the signal comes ~1 s early)
    assert code in (0, 130), err
    if code == 130:
        assert err == "workerbus demo: interrupted; its processes are stopped\n"


def _stop_demo(demo: subprocess.Popen[str], how: str) -> tuple[int, str, str]:
    try:
        assert demo.stdout is not None and demo.stderr is not None
        first = demo.stdout.readline()
        assert first.startswith("workerbus demo:")  # then it starts its broker
        if how == "SIGTERM to the demo":
            demo.send_signal(signal.SIGTERM)
        else:
            os.killpg(demo.pid, signal.SIGINT)
        code = demo.wait(timeout=30)
        err = demo.stderr.read()
        deadline = time.monotonic() + 10
        while _demo_processes(demo.pid):  # its broker and workers, same group
            assert time.monotonic() < deadline, _demo_processes(demo.pid)
            time.sleep(0.05)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
    return code, err, first


_CONNECT_THEN_STAY = """
import sys, anyio, streambus
from shared.client import Client

async def main():
    async with Client(sys.argv[1], transport=streambus.TRANSPORT) as bus:
        await bus.wait_ready()
        print(bus.worker_id, flush=True)

anyio.run(main)
print("closed", flush=True)
sys.stdin.read()  # alive, disconnected, until the test closes our stdin
"""


def test_queues_of_ended_processes_are_released_not_counted_as_drops(sock_dir: str) -> None:
    """Each `workerbus publish` leaves a queue for its pid-derived id (docs/protocol.md
    §7). Once its process has ended, the broker retires it at once: it used to stay for the
    queue grace and count every later broadcast as dropped. A disconnected process that
    is still alive keeps its queue."""
    path, stats = os.path.join(sock_dir, "bus.sock"), os.path.join(sock_dir, "stats.sock")
    address = f"unix:{path}"

    def router() -> dict[str, Any]:
        from shared.tools.statsserver import fetch_stats

        return dict(json.loads(fetch_stats(f"unix:{stats}", as_json=True))["router"])

    def wait_router(check: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        deadline = time.monotonic() + 20
        while not check(r := router()):
            assert time.monotonic() < deadline, f"{what}: {r}"
            time.sleep(0.05)
        return r

    def publish(n: int) -> None:
        done = subprocess.run(workerbus("publish", address, "s", "e", str(n), "--transport", "stream"),
                              capture_output=True, timeout=20)
        assert done.returncode == 0, done.stderr

    with broker(path, "--stats-listen", f"unix:{stats}", "--broadcast-grace", "0.2", transport="stream") as proc:
        wait_for_socket(stats, proc)
        with subprocess.Popen([sys.executable, "-c", _CONNECT_THEN_STAY, address], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) as stay:
            try:
                assert stay.stdout is not None and stay.stdin is not None
                stay_id = int(stay.stdout.readline())
                assert stay.stdout.readline() == "closed\n"
                for n in range(3):
                    publish(n)
                # the three publishers' queues go; the live process's stays
                r = wait_router(lambda r: r["queues_released"] == 3, "three publishers released")
                assert stay_id in {q["worker_id"] for q in r["queues"]}
                for n in range(3, 8):  # broadcasts after the grace: no queue of an ended process counts them
                    publish(n)
                r = wait_router(lambda r: r["queues_released"] == 8, "eight publishers released")
                assert stay_id in {q["worker_id"] for q in r["queues"]}
                assert r["queues_departed"] == 1
            finally:
                if stay.stdin is not None:
                    stay.stdin.close()
                stay.wait(timeout=20)
        r = wait_router(lambda r: r["queues_released"] == 9, "the stayer released once ended")
    assert r["queues_departed"] == 0 and r["queues"] == []
    # The stayer's queue was muted for most of the run: what it missed before a snapshot
    # settled it is a drop (it was alive and could have come back); the publishers' none.
    stayer_missed = r["dropped"]
    assert stayer_missed <= 8
    assert r["routed"] == r["sent"] + r["dropped"] + r["abandoned"] + r["queued"] + r["in_flight"], r


def test_group_takes_a_numeric_gid(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "bus.sock")
    gid = os.getgid()
    with broker(path, "--group", str(gid), "--mode", "660"):
        st = os.stat(path)
        assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (gid, 0o660)
