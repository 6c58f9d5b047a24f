"""Observability: statistics as Prometheus text and JSON, the stats socket, log rate limiting."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx
import pytest

from shared.broker import Broker
from shared.client import Client
from shared.logutil import LogLimiter
from shared.messages import ALL
from shared.stats import broker_metrics, client_metrics, process_memory, statistics_json
from shared.tools.statsserver import serve_stats
from tests.faultkit import PY, REPO, BrokerProc, reap
from tests.helpers import wait_until

_SAMPLE = re.compile(r'^[a-z_]+(\{worker_id="-?\d+"\})? -?\d+(\.\d+)?$')


def _parse(text: str) -> dict[str, float]:
    """Check the exposition line by line; return {sample name with labels: value}."""
    samples: dict[str, float] = {}
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge") and name not in typed
            assert name.endswith("_total") == (kind == "counter"), line
            typed.add(name)
            continue
        assert _SAMPLE.match(line), line
        key, value = line.rsplit(" ", 1)
        assert key.split("{")[0] in typed, line  # every sample has its TYPE line first
        samples[key] = float(value)
    return samples


def _busy_broker() -> Broker:
    broker = Broker(transport="http", expected_workers=2, max_queue_len=3)
    for i in range(5):
        broker.inject(ALL, f"event {i}".encode())
    return broker


# --- rendering -------------------------------------------------------------------------------


def test_broker_metrics_cover_every_field() -> None:
    stats = _busy_broker().statistics()
    samples = _parse(broker_metrics(stats, memory=process_memory()))
    assert samples["workerbus_router_publishes_total"] == 5
    assert samples["workerbus_router_dropped_total"] == 4  # 2 queues x (5 - 3)
    assert samples['workerbus_queue_depth{worker_id="1"}'] == 3
    assert samples['workerbus_queue_routed_total{worker_id="0"}'] == 5
    assert samples['workerbus_queue_connected{worker_id="0"}'] == 0
    assert samples["workerbus_process_resident_memory_bytes"] > 0
    # Every numeric field of the dataclasses is exported, none silently skipped.
    for name in ("connections", "accepted", "refused", "protocol_errors", "refused_untrusted",
                 "refused_over_limit", "handshake_timeouts", "open_connections"):
        assert any(k.startswith(f"workerbus_broker_{name}") for k in samples), name
    for name in ("routed", "sent", "queued", "in_flight", "overflow_disconnects", "unroutable"):
        assert any(k.startswith(f"workerbus_router_{name}") for k in samples), name


def test_client_metrics() -> None:
    stats = Client("unix:/nonexistent", transport="http", worker_id=3).statistics()
    samples = _parse(client_metrics(stats))
    assert samples['workerbus_client_connected{worker_id="3"}'] == 0
    assert samples['workerbus_client_dropped_by_broker_total{worker_id="3"}'] == 0


def test_statistics_json_round_trips() -> None:
    doc = json.loads(statistics_json(_busy_broker().statistics(), memory=process_memory()))
    assert doc["router"]["publishes"] == 5
    assert [q["worker_id"] for q in doc["router"]["queues"]] == [0, 1]
    assert doc["process_memory"]["peak"] >= doc["process_memory"]["rss"] > 0


def test_process_memory_of_a_missing_pid_is_none() -> None:
    assert process_memory(2**22 + 12345) is None


# --- the stats socket ------------------------------------------------------------------------


@asynccontextmanager
async def stats_server(address: str, broker: Broker) -> AsyncIterator[httpx.AsyncClient]:
    async with anyio.create_task_group() as tg:
        await tg.start(lambda task_status: serve_stats(address, broker.statistics, task_status=task_status))
        transport = httpx.AsyncHTTPTransport(uds=address[len("unix:") :])
        async with httpx.AsyncClient(transport=transport, base_url="http://workerbus") as http:
            yield http
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_stats_socket_serves_metrics_and_json(sock_dir: str) -> None:
    address = f"unix:{os.path.join(sock_dir, 'stats.sock')}"
    broker = _busy_broker()
    async with stats_server(address, broker) as http:
        assert stat.S_IMODE(os.stat(address[5:]).st_mode) == 0o600
        metrics = await http.get("/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert _parse(metrics.text)["workerbus_router_publishes_total"] == 5
        as_json = await http.get("/stats")
        assert as_json.json()["router"]["dropped"] == 4
        assert (await http.get("/nope")).status_code == 404
        assert (await http.post("/metrics")).status_code == 405
        head = await http.head("/metrics")
        assert head.status_code == 200 and head.content == b""
    assert _gone(address[5:])


def _gone(path: str) -> bool:
    return not os.path.lexists(path)


@pytest.mark.anyio
async def test_stats_socket_answers_garbage_with_400(sock_dir: str) -> None:
    address = f"unix:{os.path.join(sock_dir, 'stats.sock')}"
    async with stats_server(address, _busy_broker()):
        with anyio.fail_after(10):
            stream = await anyio.connect_unix(address[5:])
            async with stream:
                await stream.send(b"\x00\x01 not http\r\n\r\n")
                answer = await stream.receive()
        assert answer.startswith(b"HTTP/1.1 400 ")


@pytest.mark.slow
def test_workerbus_stats_command(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "bus.sock")
    with reap() as procs:
        broker = BrokerProc(path, "--workers", "2")
        procs.append(broker)
        published = subprocess.run([PY, "-m", "shared.tools.cli", "publish", f"unix:{path}", "s", "e"], cwd=REPO, timeout=30)
        assert published.returncode == 0
        text = subprocess.run([PY, "-m", "shared.tools.cli", "stats", f"unix:{broker.stats_path}"],
                              cwd=REPO, capture_output=True, text=True, timeout=30)
        assert text.returncode == 0
        assert _parse(text.stdout)["workerbus_router_publishes_total"] == 1
        doc = subprocess.run([PY, "-m", "shared.tools.cli", "stats", f"unix:{broker.stats_path}", "--json"],
                             cwd=REPO, capture_output=True, text=True, timeout=30)
        assert json.loads(doc.stdout)["accepted"] == 1
    gone = subprocess.run([PY, "-m", "shared.tools.cli", "stats", f"unix:{path}.stats"],
                          cwd=REPO, capture_output=True, text=True, timeout=30)
    assert gone.returncode == 1 and "cannot fetch statistics" in gone.stderr


# --- log rate limiting -----------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_log_limiter_lets_a_burst_through_then_counts(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    clock = _Clock()
    limiter = LogLimiter(logging.getLogger("t"), burst=2, interval=10.0, clock=clock)
    for pid in range(5):
        limiter.log(logging.WARNING, "peer %d misbehaved", pid)
    limiter.log(logging.WARNING, "another kind %d", 1)  # kinds are counted apart
    assert [r.getMessage() for r in caplog.records] == ["peer 0 misbehaved", "peer 1 misbehaved", "another kind 1"]
    assert limiter.suppressed == 3
    caplog.clear()
    clock.now = 10.0
    limiter.log(logging.WARNING, "peer %d misbehaved", 9)  # new window: report, then log
    assert [r.getMessage() for r in caplog.records] == [
        "3 more lines like this suppressed in 10 s, the latest: peer 4 misbehaved",
        "peer 9 misbehaved",
    ]


def test_log_limiter_flush_reports_a_storm_that_stopped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    clock = _Clock()
    limiter = LogLimiter(logging.getLogger("t"), burst=1, interval=5.0, clock=clock)
    for _ in range(4):
        limiter.log(logging.ERROR, "boom")
    limiter.flush()
    assert len(caplog.records) == 1  # window still open: nothing to report yet
    clock.now = 6.0
    limiter.flush()
    assert caplog.records[-1].getMessage() == "3 more lines like this suppressed in 5 s, the latest: boom"
    assert caplog.records[-1].levelno == logging.ERROR
    limiter.flush()
    assert len(caplog.records) == 2  # reported once


def test_log_limiter_options() -> None:
    with pytest.raises(ValueError, match="burst"):
        LogLimiter(logging.getLogger("t"), burst=0)
    with pytest.raises(ValueError, match="interval"):
        LogLimiter(logging.getLogger("t"), interval=0)


@pytest.mark.anyio
async def test_client_reconnect_failures_do_not_flood_the_log(
    sock_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "shared.client")
    address = f"unix:{os.path.join(sock_dir, 'nobody-home.sock')}"
    async with Client(address, transport="http", worker_id=4, reconnect_min=0.001, reconnect_max=0.002) as bus:
        await wait_until(lambda: bus._reconnect_log.suppressed >= 20, 10)  # many attempts
    warnings = [r for r in caplog.records if "cannot reach the broker" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "(attempt 1)" in warnings[0].getMessage()
