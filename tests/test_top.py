"""``workerbus top``: the live view of a broker, against a real broker and real workers.

The broker and the workers are subprocesses (the broker through the ``workerbus`` command,
the workers through tests.faultkit); ``top`` runs as a user runs it: ``--once`` through a
pipe, the refreshing view on a pseudo-terminal where ``q`` and Ctrl-C are typed.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import termios
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import pytest

from shared.broker import Broker
from shared.client import Client
from shared.tools.top import build_view, render_plain
from tests.faultkit import PY, REPO, BrokerProc, Child, reap
from tests.helpers import wait_until
from tests.ptykit import PtyProc, strip_escapes

TOP = [PY, "-m", "shared.tools.cli", "top"]


def _top(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TOP, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)


def _rows(out: str) -> dict[int, list[str]]:
    """The worker table of a plain snapshot: {worker id: cells}."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("WORKER"))
    rows: dict[int, list[str]] = {}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        cells = line.split()
        rows[int(cells[0])] = cells
    return rows


def _num(cell: str) -> float:
    return float(cell.replace(",", ""))


# --- the view, from samples (no processes) -----------------------------------------------


def _doc(sent: int, dropped: int, publishes: int, *, connected: bool = True) -> dict[str, Any]:
    queue = {"worker_id": 0, "connected": connected, "depth": 2, "sent": sent, "dropped": dropped}
    return {
        "pid": 99, "expected_workers": 2, "connections": 1, "open_connections": 1, "accepted": 1,
        "refused": 0, "workers": [{"worker_id": 0, "pid": 1234, "uid": 0}] if connected else [],
        "router": {"publishes": publishes, "sent": sent, "dropped": dropped, "queued": 2, "unroutable": 0,
                   "queues": [queue, {**queue, "worker_id": 1, "connected": False, "sent": 0, "dropped": 0},
                              {**queue, "worker_id": 7, "connected": False}]},
    }  # fmt: skip


def test_rates_come_from_two_samples() -> None:
    view = build_view("unix:/x", (12.0, _doc(sent=700, dropped=30, publishes=500)), (10.0, _doc(100, 10, 100)))
    assert view.span == 2.0 and view.broker_pid == 99 and (view.expected, view.connected) == (2, 1)
    rows = {r.worker_id: r for r in view.rows}
    assert (rows[0].pid, rows[0].state, rows[0].delivered_per_s, rows[0].dropped_per_s) == (1234, "connected", 300, 10)
    assert (rows[1].pid, rows[1].state) == (None, "absent")  # expected id, not connected
    assert rows[7].state == "leaving"  # an unexpected id's queue in its grace period
    totals = {t.name: t.per_s for t in view.totals}
    assert totals["publishes"] == 200 and totals["delivered"] == 300
    text = "\n".join(render_plain(view))
    assert "rates over 2.0 s" in text and "\x1b" not in text
    assert _rows(text)[0] == ["0", "1234", "connected", "2", "700", "300", "30", "10"]


def test_a_restarted_broker_has_no_rate_until_the_next_sample() -> None:
    # Counters that went down: the broker restarted between the samples; no negative rate.
    view = build_view("unix:/x", (11.0, _doc(5, 0, 5)), (10.0, _doc(100, 10, 100)))
    assert {r.worker_id: r.delivered_per_s for r in view.rows}[0] is None
    assert _rows("\n".join(render_plain(view)))[0][5] == "–"
    first = build_view("unix:/x", (10.0, _doc(5, 0, 5)))
    assert first.span is None and all(r.delivered_per_s is None for r in first.rows)


# --- what the stats socket adds for top ----------------------------------------------------


@pytest.mark.anyio
async def test_statistics_name_each_connected_worker_and_its_pid(address: str) -> None:
    broker = Broker(transport="http", expected_workers=3)
    async with anyio.create_task_group() as tg:
        await tg.start(broker.serve, address)
        async with Client(address, transport="http", worker_id=1) as bus:
            await bus.wait_ready()
            await wait_until(lambda: broker.statistics().connections == 1)
            stats = broker.statistics()
            assert stats.expected_workers == 3 and stats.pid == os.getpid()
            ((wid, pid, uid),) = [(w.worker_id, w.pid, w.uid) for w in stats.workers]
            assert (wid, pid) == (1, os.getpid())
            assert uid in (None, os.getuid())
        tg.cancel_scope.cancel()


# --- against a real broker with real workers -----------------------------------------------


@contextmanager
def _busy_bus(sock_dir: str) -> Iterator[tuple[BrokerProc, Child, Child]]:
    """A broker expecting workers 0..2; 0 and 1 connected, 1 flooding, 2 never comes."""
    path = os.path.join(sock_dir, "bus.sock")
    with reap() as procs:
        broker = BrokerProc(path, "--workers", "3", "--max-queue-len", "50", "--log-level", "WARNING")
        procs.append(broker)
        w0 = Child("worker", f"unix:{path}", "--id", "0")
        procs.append(w0)
        w1 = Child("worker", f"unix:{path}", "--id", "1")
        procs.append(w1)
        for w, wid in ((w0, 0), (w1, 1)):
            w.expect(lambda m, wid=wid: m.get("ready") == wid, f"worker {wid} ready")  # type: ignore[misc]
        w0.send("publish", 100, "counted")
        w0.expect(lambda m: m.get("published") == 100, "100 publishes")
        w0.send("flush")
        w0.expect(lambda m: "flushed" in m, "the flush")
        # Traffic while top samples: bounded by the test (the workers are killed on the way out).
        w1.send("flood", 120)
        yield broker, w0, w1


@pytest.mark.slow
def test_once_prints_the_workers_with_sensible_numbers(sock_dir: str) -> None:
    with _busy_bus(sock_dir) as (broker, w0, w1):
        done = _top(f"unix:{broker.stats_path}", "--once", "--interval", "1")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "\x1b" not in out and "\r" not in out  # for scripts: no escape codes
    assert f"workerbus broker pid {broker.pid} at unix:{broker.stats_path}" in out
    assert re.search(r"rates over \d+\.\d s", out)
    assert "workers: 2 connected, 3 expected" in out
    rows = _rows(out)
    assert set(rows) >= {0, 1, 2}
    assert rows[0][1:3] == [str(w0.pid), "connected"] and rows[1][1:3] == [str(w1.pid), "connected"]
    assert rows[2][1:3] == ["–", "absent"]
    # QUEUE DELIVERED DELIVERED/S DROPPED DROPPED/S
    assert _num(rows[0][4]) >= 100 and _num(rows[0][5]) > 0  # the flood reaches worker 0
    assert _num(rows[2][3]) == 50 and _num(rows[2][6]) > 0  # nobody drains 2: full, dropping
    publishes = re.search(r"publishes ([\d,]+) \(([\d,]+)/s\)", out)
    assert publishes and _num(publishes.group(1)) >= 100 and _num(publishes.group(2)) > 0
    # One sample's numbers add up: the totals are the sums over the queues (none retired here).
    delivered = re.search(r"delivered ([\d,]+) \(([\d,]+)/s\)", out)
    assert delivered is not None
    assert _num(delivered.group(1)) == sum(_num(r[4]) for r in rows.values())
    assert abs(_num(delivered.group(2)) - sum(_num(r[5]) for r in rows.values())) <= len(rows)  # rounding


@pytest.mark.slow
@pytest.mark.parametrize("style", ["rich", "plain"])
def test_live_view_on_a_terminal_quits_on_q(sock_dir: str, style: str) -> None:
    with _busy_bus(sock_dir) as (broker, w0, _), PtyProc(
        [*TOP, f"unix:{broker.stats_path}", "--interval", "0.3", *(["--plain"] if style == "plain" else [])]
    ) as top:
        screen = top.read_until(lambda t: str(w0.pid) in t and "rates over" in t, "the table with rates")
        words = strip_escapes(screen)
        assert "WORKER" in words and "DELIVERED/S" in words and "absent" in words and "connected" in words
        assert "\x1b[?1049h" in screen  # drawn on the alternate screen, like htop
        frames = screen.count("rates over")
        top.read_until(lambda t: t.count("rates over") > frames, "a refresh")
        top.send(b"q")
        assert top.wait() == 0
        assert top.text.rstrip().endswith("\x1b[?1049l") or "\x1b[?1049l" in top.text[-200:]
        assert "Traceback" not in top.text


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_live_view_exits_cleanly_on_ctrl_c_and_sigterm(sock_dir: str, how: str) -> None:
    with _busy_bus(sock_dir) as (broker, _, _), PtyProc([*TOP, f"unix:{broker.stats_path}", "--interval", "0.3"]) as top:
        top.read_until(lambda t: "WORKER" in t, "the table")
        if how == "ctrl-c":
            top.send(b"\x03")  # typed on the terminal: SIGINT to its foreground process group
        else:
            top.proc.send_signal(signal.SIGTERM)
        assert top.wait() == 0
        assert "Traceback" not in top.text and "KeyboardInterrupt" not in top.text
        assert "\x1b[?1049l" in top.text[-200:]  # the terminal is given back (main screen)
        assert termios.tcgetattr(top.master)[3] & termios.ICANON  # and in line mode again


@pytest.mark.slow
def test_through_a_pipe_it_prints_plain_tables_until_interrupted(sock_dir: str) -> None:
    with _busy_bus(sock_dir) as (broker, _, _):
        proc = subprocess.Popen([*TOP, f"unix:{broker.stats_path}", "--interval", "0.2"], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert proc.stdout is not None
            headers = 0
            for line in proc.stdout:  # bounded: the test's timeout; two tables are enough
                assert "\x1b" not in line and "\r" not in line
                headers += line.startswith("WORKER")
                if headers == 2:
                    break
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            assert proc.stderr is not None
            err = proc.stderr.read()
            proc.stdout.close() if proc.stdout else None
            proc.stderr.close()
        assert err == ""


# --- errors: one line, non-zero ---------------------------------------------------------------


def _one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 1, done
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("workerbus top: "), done.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_no_stats_socket_there(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "missing.sock")
    _one_line_error(_top(f"unix:{path}", "--once"), "no stats socket at", "--stats-listen")


def test_a_regular_file_is_not_a_stats_socket(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "file")
    open(path, "w").close()
    _one_line_error(_top(f"unix:{path}", "--once"), "is not a socket")


def test_a_stale_socket_file_with_nobody_listening(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "stale.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)  # bound, never listening, then closed: a leftover file
    _one_line_error(_top(f"unix:{path}", "--once"), "nothing listens on")


@pytest.mark.parametrize("address", ["/tmp/stats.sock", "unix:", "unix:stats.sock", "tcp:127.0.0.1:1"])
def test_not_a_unix_address_is_a_usage_error(address: str) -> None:
    # (exit 2 and the argument's name, as every command's bad arguments: README)
    done = _top(address, "--once")
    assert done.returncode == 2 and done.stdout == "", done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("workerbus top: argument unix:STATS-PATH: "), done.stderr


def test_bad_interval_is_a_usage_error() -> None:
    done = _top("unix:/tmp/x", "--interval", "0")
    assert done.returncode == 2 and "--interval" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["http", "stream"])
def test_the_bus_socket_instead_of_the_stats_socket(sock_dir: str, transport: str) -> None:
    path = os.path.join(sock_dir, "bus.sock")
    with reap() as procs:
        broker = BrokerProc(path, "--transport", transport, "--handshake-timeout", "1", "--log-level", "ERROR")
        procs.append(broker)
        _one_line_error(_top(f"unix:{path}", "--once"), "does not answer like a stats socket", "bus socket")


@pytest.mark.slow
def test_the_broker_going_away_ends_the_view_with_one_line(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "bus.sock")
    with reap() as procs:
        broker = BrokerProc(path, "--log-level", "WARNING")
        procs.append(broker)
        proc = subprocess.Popen([*TOP, f"unix:{broker.stats_path}", "--interval", "0.2"], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().startswith("workerbus broker pid")  # it is running
            assert broker.stop() == 0
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("workerbus top: "), err
