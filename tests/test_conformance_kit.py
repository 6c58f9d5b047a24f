"""The conformance kit itself: it must pass correct brokers and catch broken ones.

Brokers run as subprocesses on short temp socket paths, with output going to files (a
chatty broker must never block on a full pipe). Every wait is bounded; every process is
killed in ``finally``. The kit runs in-process (``run_suite``) except where the command
line itself is under test.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import msgpack
import pytest

from shared.tools.conformance.casekit import KitConfig
from shared.tools.conformance.profiles import PROFILES
from shared.tools.conformance.runner import Report, all_cases, run_suite, select
from shared.tools.conformance.wire import UPGRADE_REQUEST

REPO = Path(__file__).resolve().parents[1]
FAKE = str(REPO / "tests" / "fake_brokers.py")
PY = sys.executable
#: Short deadlines so a full kit run takes a few seconds; the brokers are started to match.
DEADLINE = 1.0
#: The unique window: the kit's three duplicate publishes come from two connections, so
#: the broker must see both within it. 0.3 s once failed under a load of ~15 on 2 cores (a
#: stalled sender); 1 s costs ~0.7 s per kit run that includes unique.dedup.
UNIQUE = 1.0
CASE_TIMEOUT = 3.0
START_TIMEOUT = 15.0


@pytest.fixture
def kit_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="wbk-")  # short: socket paths must fit in 108 bytes
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _accepts(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


@contextmanager
def process(args: Sequence[str], path: str, log: str) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``args``, wait (bounded) until ``path`` accepts, stop it afterwards."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        limit = time.monotonic() + START_TIMEOUT
        while not _accepts(path):
            if proc.poll() is not None or time.monotonic() > limit:
                pytest.fail(f"{args} did not start listening on {path}: {Path(log).read_text()}")
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def fake(kit_dir: str, transport: str = "http", flaw: str = "none") -> tuple[list[str], str]:
    path = os.path.join(kit_dir, "fake.sock")
    args = [PY, FAKE, path, "--transport", transport, "--flaw", flaw,
            "--deadline", str(DEADLINE), "--unique-timeout", str(UNIQUE)]
    return args, path


def kit(path: str, transport: str = "http", only: Sequence[str] | None = None,
        profile: str = "native", workers: int | None = None,
        max_payload: int | None = None, extensions: bool = True) -> tuple[Report, str]:
    cfg = KitConfig(address=f"unix:{path}", path=path, transport=transport,
                    profile=PROFILES[profile], case_timeout=CASE_TIMEOUT,
                    handshake_deadline=DEADLINE, unique_timeout=UNIQUE, workers=workers,
                    max_payload=max_payload, extensions=extensions)
    out = io.StringIO()
    report = run_suite(cfg, only, out)
    return report, out.getvalue()


def failures(report: Report) -> dict[str, str | None]:
    return {c.name: c.reason for c in report.cases if c.status == "fail"}


def statuses(report: Report) -> dict[str, str]:
    return {c.name: c.status for c in report.cases}


HANDSHAKE_ONLY = {c.name for c in all_cases() if c.http_only}


# --- the kit against known-good brokers ---------------------------------------------------


@pytest.mark.parametrize("transport", ["http", "stream"])
def test_kit_passes_correct_reference_broker(kit_dir: str, transport: str) -> None:
    args, path = fake(kit_dir, transport)
    with process(args, path, os.path.join(kit_dir, "log")):
        report, text = kit(path, transport)
    assert failures(report) == {}, text
    skipped = {c.name for c in report.cases if c.status == "skip"}
    expected = {"frame.oversize", "queue.pre-created", "native.pong-overflow", "order.pre-created-ids",
                "cluster.granted"}
    # The reference fake does not offer "filter" (a negotiated extension): those cases skip.
    expected |= {"filter.honoured", "filter.plain-hello", "filter.bad-sub"}
    # Nor "unframed" (asked without the welcome it is not granted anywhere: that case runs).
    expected |= {"unframed.granted"}
    assert skipped == (expected | HANDSHAKE_ONLY if transport == "stream" else expected)
    assert text.splitlines()[-1] == report.totals_line()


@pytest.mark.parametrize("transport", ["http", "stream"])
def test_kit_passes_serve_and_serve_reports_the_kits_bad_input(
        kit_dir: str, transport: str) -> None:
    path = os.path.join(kit_dir, "serve.sock")
    report_path = os.path.join(kit_dir, "serve.json")
    log = os.path.join(kit_dir, "log")
    args = [PY, "-m", "shared.tools.conformance", "serve", f"unix:{path}", "--transport", transport,
            "--handshake-deadline", str(DEADLINE), "--unique-timeout", str(UNIQUE),
            "--workers", "2", "--max-payload", "60000", "--json", report_path]
    with process(args, path, log) as proc:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        report, text = kit(path, transport, workers=2, max_payload=60000)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(10)
    assert failures(report) == {}, text
    assert statuses(report)["frame.oversize"] == "pass"
    assert statuses(report)["queue.pre-created"] == "pass"
    assert statuses(report)["order.pre-created-ids"] == "pass"
    # The kit sends bad input on purpose; serve must have called out each kind of it.
    assert code == 1
    assert not os.path.exists(path), "serve must remove its socket file"
    summary = json.loads(Path(report_path).read_text())
    kinds = set(summary["totals"]["by_kind"])
    expected = {"deadline", "undecodable", "publish", "hello", "frame-length", "truncated"}
    if transport == "http":
        expected |= {"upgrade-request", "upgrade-rejected"}
    assert expected <= kinds, Path(log).read_text()
    assert "VIOLATION" in Path(log).read_text()


# --- the kit against deliberately broken brokers ------------------------------------------


@pytest.mark.parametrize(
    ("flaw", "case"),
    [
        ("reencode", "broadcast.bytes-unchanged"),
        ("drop-after-head", "pipeline.one-send"),
        ("no-dedup", "unique.dedup"),
        ("die-on-bad-input", "bad.undecodable"),
        ("die-on-bad-input", "frame.empty"),
        ("die-on-bad-input", "bad.hello-schema"),
        ("no-welcome", "native.welcome"),
        ("early-pong", "native.barrier"),
        ("scope-for-anyone", "cluster.not-asked"),
        ("unframed-but-framed", "unframed.granted"),
    ],
)
def test_kit_catches_broken_broker(kit_dir: str, flaw: str, case: str) -> None:
    args, path = fake(kit_dir, flaw=flaw)
    with process(args, path, os.path.join(kit_dir, "log")):
        report, text = kit(path, only=[case])
    assert statuses(report) == {case: "fail"}, text
    assert failures(report)[case], "a failure must carry its reason"
    assert text.splitlines()[-1] == "0 passed, 1 failed"


def test_dying_broker_fails_bad_input_case_in_a_full_bad_input_run(kit_dir: str) -> None:
    args, path = fake(kit_dir, flaw="die-on-bad-input")
    with process(args, path, os.path.join(kit_dir, "log")) as proc:
        report, text = kit(path, only=["bad.*"])
        assert proc.wait(5) == 3, "the fake must really have died"
    assert report.cases[0].name == "bad.undecodable"
    assert report.cases[0].status == "fail", text
    index = [c.name for c in all_cases()].index("bad.undecodable")
    bystander = 1000 + 10 * index + 1
    # Whether the kit's write or its read to the bystander fails first is up to the kernel
    # (which of the dead broker's sockets it closes first); the reason names it either way.
    assert f"bystander {bystander}:" in (report.cases[0].reason or ""), text


def test_kit_checks_order_on_the_brokers_own_worker_ids(kit_dir: str) -> None:
    # Every 50th delivery to worker 1 comes one place late: invisible to the cases that
    # keep to ids 1000+, caught once the kit is told the broker's ids (--workers).
    args, path = fake(kit_dir, flaw="late-to-worker-1")
    with process(args, path, os.path.join(kit_dir, "log")):
        report, text = kit(path, only=["order.*"], workers=2)
    assert statuses(report) == {"order.global-and-fifo": "pass",
                                "order.pre-created-ids": "fail"}, text
    assert re.search(r"\bworker 1\b", failures(report)["order.pre-created-ids"] or ""), text


# --- selection, command line, JSON --------------------------------------------------------


def test_only_selects_by_substring_and_glob_with_stable_ids() -> None:
    names = [c.name for c in all_cases()]
    assert len(names) == len(set(names))
    assert [c.name for _, c in select(["handshake."])] == [
        n for n in names if n.startswith("handshake.")]
    assert [c.name for _, c in select(["bad.*-str"])] == ["bad.data-str"]
    assert [c.name for _, c in select(["target.worker", "queue.late*"])] == [
        "target.worker", "queue.late-joiner"]
    # A case keeps its registry index (hence its worker ids) however it is selected.
    index = {c.name: i for i, c in enumerate(all_cases())}
    assert all(index[c.name] == i for i, c in select(["unique"]))


def test_cli_lines_exit_status_and_json_report(kit_dir: str) -> None:
    args, path = fake(kit_dir, flaw="no-dedup")
    report_path = os.path.join(kit_dir, "report.json")
    with process(args, path, os.path.join(kit_dir, "log")):
        run = subprocess.run(
            [PY, "-m", "shared.tools.conformance", "broker", f"unix:{path}", "--only", "basic",
             "--only", "unique.*", "--only", "frame.oversize", "--unique-timeout", str(UNIQUE),
             "--json", report_path],
            capture_output=True, text=True, timeout=30, cwd=REPO, check=False)
    lines = run.stdout.splitlines()
    assert run.returncode == 1, run.stdout + run.stderr
    assert lines[1] .startswith("PASS basic.roundtrip")
    assert lines[2].startswith("SKIP frame.oversize") and "--max-payload" in lines[2]
    assert lines[3].startswith("FAIL unique.dedup") and "expected exactly one" in lines[3]
    assert lines[-1] == "1 passed, 1 failed, 1 skipped"
    data = json.loads(Path(report_path).read_text())
    assert data["target"] == f"unix:{path}"
    assert (data["transport"], data["profile"]) == ("http", "native")
    assert data["totals"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert [c["status"] for c in data["cases"]] == ["pass", "skip", "fail"]
    assert set(data["cases"][0]) >= {"name", "status", "reason", "duration"}


def test_cli_rejects_bad_address_and_unknown_case() -> None:
    for extra in (["tcp:1.2.3.4"], ["unix:/nonexistent.sock", "--only", "no-such-case"]):
        run = subprocess.run([PY, "-m", "shared.tools.conformance", "broker", *extra],
                             capture_output=True, text=True, timeout=30, cwd=REPO, check=False)
        assert run.returncode == 2, run.stderr


# The kit as a black box (it loads none of the library, checked on sys.modules in a fresh
# interpreter): tests/test_layers.py::test_the_conformance_kit_loads_none_of_the_library.


# --- serve judging clients ----------------------------------------------------------------


def _frame(obj: object) -> bytes:
    payload: bytes = msgpack.packb(obj, use_bin_type=True)
    return len(payload).to_bytes(2, "big") + payload


def _client(path: str, head: bytes, wid: int, publishes: list[object]) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(path)
    sock.sendall(head + _frame({"id": wid, "pid": 4242}) + b"".join(map(_frame, publishes)))
    return sock


def _read_some(sock: socket.socket, n: int) -> bytes:
    data = b""
    limit = time.monotonic() + 5
    while len(data) < n and time.monotonic() < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_serve_reports_misbehaving_client_and_not_correct_one(kit_dir: str) -> None:
    path = os.path.join(kit_dir, "serve.sock")
    report_path = os.path.join(kit_dir, "serve.json")
    log = os.path.join(kit_dir, "log")
    args = [PY, "-m", "shared.tools.conformance", "serve", f"unix:{path}", "--json", report_path]
    good_event = msgpack.packb({"source": "s", "event": "e", "data": [1], "wid": 7},
                               use_bin_type=True)
    bad_event = msgpack.packb({"source": "s", "event": "e", "wid": 9, "extra": 1},
                              use_bin_type=True)
    sloppy_head = UPGRADE_REQUEST.replace(b"Host: localhost\r\n", b"host: localhost\r\n")
    with process(args, path, log) as proc:
        good = _client(path, UPGRADE_REQUEST, 7, [{"spec": {}, "data": good_event}])
        # The correct client gets the 101 and its own event back, byte for byte.
        got = _read_some(good, 87 + 2 + len(good_event))
        assert got.startswith(b"HTTP/1.1 101 ") and got.endswith(good_event)
        sloppy = _client(path, sloppy_head, 8, [{"spec": {}, "data": bad_event},
                                                {"spec": {}, "data": "text"}])
        _read_some(sloppy, 10**6)  # until serve closes it (after the str data)
        good.close()
        sloppy.close()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(10)
    assert code == 1
    summary = json.loads(Path(report_path).read_text())
    by_id: dict[object, list[str]] = {}
    for v in summary["violations"]:
        by_id.setdefault(v["id"], []).append(v["kind"])
    assert 7 not in by_id, summary
    # The sloppy request head is reported once the hello names the client.
    assert sorted(by_id[8]) == ["inner-event", "inner-event", "publish", "upgrade-request"]
    assert set(by_id) == {8}
    messages = " ".join(v["message"] for v in summary["violations"])
    assert "unknown keys ['extra']" in messages and "differs from the hello id 8" in messages
    text = Path(log).read_text()
    assert "id=8 pid=4242" in text and "connections, 4 violations" in text


def test_serve_exits_zero_for_clean_clients_and_refuses_a_live_socket(kit_dir: str) -> None:
    path = os.path.join(kit_dir, "serve.sock")
    args = [PY, "-m", "shared.tools.conformance", "serve", f"unix:{path}", "--transport", "stream"]
    with process(args, path, os.path.join(kit_dir, "log")) as proc:
        second = subprocess.run(args, capture_output=True, text=True, timeout=30, cwd=REPO,
                                check=False)
        assert second.returncode == 2 and "already listening" in second.stdout
        event = msgpack.packb({"source": "s", "event": "e", "wid": 3}, use_bin_type=True)
        client = _client(path, b"", 3, [{"spec": {"unique": "k"}, "data": event}])
        assert _read_some(client, 2 + len(event)).endswith(event)
        client.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0


# --- the project's real broker --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("transport", "profile"),
                         [("http", "native"), ("stream", "native"), ("http", "kong")])
def test_real_broker_passes_the_kit(kit_dir: str, transport: str, profile: str) -> None:
    path = os.path.join(kit_dir, "real.sock")
    args = [PY, "-m", "shared.tools.cli", "broker", "--listen", f"unix:{path}",
            "--transport", transport, "--profile", profile, "--unique-timeout", str(UNIQUE),
            "--handshake-timeout", str(DEADLINE), "--workers", "2", "--max-payload-len", "60000"]
    log = os.path.join(kit_dir, "log")
    with process(args, path, log):
        report, text = kit(path, transport, profile=profile, workers=2, max_payload=60000)
    assert failures(report) == {}, text
    assert statuses(report)["queue.pre-created"] == "pass"
    assert statuses(report)["order.pre-created-ids"] == "pass"
    assert statuses(report)["frame.oversize"] == "pass"
