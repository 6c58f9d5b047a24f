"""Fault injection with real processes and real signals (issue 7, "Faults").

Each test runs ``workerbus broker`` as a user would (``--stats-listen`` on), workers as
separate processes (tests/faultkit.py), and checks from the outside: the broker stays up
or a new one takes over, its memory stays bounded, and the counters account for every
event (``routed == sent + dropped + queued + in_flight``, per queue and in total).
"""

from __future__ import annotations

import os
import signal
import stat

import pytest

from tests.faultkit import BrokerProc, Child, Message, assert_identity, reap, wait_for

pytestmark = pytest.mark.slow

#: A broker serving a few workers sits around 30 MB; anything near this means a leak.
RSS_CEILING = 200 * 1024 * 1024


def _ready(m: Message) -> bool:
    return "ready" in m


def test_broker_kill9_mid_stream_then_a_new_broker_takes_over(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "bus.sock")
    address = f"unix:{path}"
    with reap() as procs:
        b1 = BrokerProc(path, "--workers", "2")
        procs.append(b1)
        w0 = Child("worker", address, "--id", "0")
        w1 = Child("worker", address, "--id", "1", "--backend", "trio")
        procs += [w0, w1]
        w0.expect(_ready, "worker 0")
        w1.expect(_ready, "worker 1")

        # A handler is running on worker 0 when the broker dies: it must finish.
        w1.send("slow", 2.0, "worker:0")
        w0.expect(lambda m: m.get("handler") == "start", "the slow handler to start")

        # Kill the broker while worker 1 floods it.
        w1.send("flood", 1.5)
        wait_for(lambda: w0.report()["by_event"].get("flood", 0) > 0, "the flood to reach worker 0")
        b1.signal(signal.SIGKILL)
        b1.popen.wait(timeout=10)
        assert os.path.exists(path)  # the dead broker's socket file stays: stale

        flood = w1.expect(lambda m: "flooded" in m, "the flood to end")
        flooded = flood["flooded"]
        # Published while no broker is up: kept in worker 1's buffer, not lost.
        wait_for(lambda: not w1.report()["connected"], "worker 1 to notice")
        w1.send("publish", 300, "during")
        assert w1.expect(lambda m: "published" in m and m.get("refused") is not None, "publish")["refused"] == 0

        b2 = BrokerProc(path, "--workers", "2", backend="trio")  # replaces the stale file
        procs.append(b2)
        w0.expect(lambda m: m.get("handler") == "end", "the slow handler to finish")

        def all_arrived() -> bool:
            r = w0.report()
            return bool(r["by_event"].get("during", 0) >= 300 and r["connects"] >= 2)

        wait_for(all_arrived, "the buffered publishes to reach worker 0 via the new broker")
        r0, r1 = w0.report(), w1.report()
        assert r0["by_event"]["during"] == 300  # each exactly once
        assert r0["out_of_order"] == 0
        assert r0["by_event"]["flood"] <= flooded
        assert r1["buffered"] == 0 and r1["connects"] == 2
        # The flood may have met a full buffer while no broker was up: refused, not lost.
        assert r1["published"] + flood["refused"] == flooded + 300 + 1
        stats = b2.stats()
        assert_identity(stats)
        assert stats["router"]["dropped"] == 0
        assert b2.peak_rss() < RSS_CEILING


def test_client_killed_mid_frame_only_it_is_dropped(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "bus.sock")
    address = f"unix:{path}"
    with reap() as procs:
        broker = BrokerProc(path, "--workers", "1")
        procs.append(broker)
        w0 = Child("worker", address, "--id", "0")
        raw = Child("raw", address, "--id", "7")
        procs += [w0, raw]
        w0.expect(_ready, "worker 0")
        raw.expect(lambda m: "mid_frame" in m, "the raw peer to stop mid-frame")
        # Its one whole publish went through before it stopped.
        wait_for(lambda: w0.report()["by_event"].get("raw") == 1, "the raw publish")

        raw.kill()
        wait_for(lambda: broker.stats()["protocol_errors"] == 1, "the broker to drop the half frame")
        assert broker.stats()["connections"] == 1  # worker 0 is still connected

        w1 = Child("worker", address, "--id", "1")
        procs.append(w1)
        w1.expect(_ready, "worker 1")
        w1.send("publish", 10, "after")
        wait_for(lambda: w0.report()["by_event"].get("after") == 10, "worker 0 to keep receiving")
        log = broker.log()
        assert f"worker 7 (pid {raw.pid})" in log and "stream ended inside a frame" in log
        assert_identity(broker.stats())
        assert broker.alive()


def test_socket_file_deleted_under_a_running_broker_is_recreated(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "bus.sock")
    address = f"unix:{path}"
    with reap() as procs:
        broker = BrokerProc(path)
        procs.append(broker)
        w0 = Child("worker", address, "--id", "0")
        procs.append(w0)
        w0.expect(_ready, "worker 0")
        first = os.stat(path).st_ino

        os.unlink(path)
        wait_for(lambda: os.path.exists(path), "the socket file to come back", timeout=10)
        assert os.stat(path).st_ino != first
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

        # A new worker reaches the broker through the new file; the old connection works.
        w1 = Child("worker", address, "--id", "1")
        procs.append(w1)
        w1.expect(_ready, "worker 1 through the re-created file")
        w1.send("publish", 10, "x")
        wait_for(lambda: w0.report()["by_event"].get("x") == 10, "worker 0 (old connection) to receive")
        assert "was deleted under the running broker" in broker.log()
        assert broker.stop() == 0
        assert not os.path.exists(path)  # it removed its own (re-created) file


def test_reconnect_storm_of_100_clients(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "bus.sock")
    address = f"unix:{path}"
    per_process, processes = 25, 4
    total = per_process * processes
    with reap() as procs:
        b1 = BrokerProc(path)
        procs.append(b1)
        storms = [
            Child("storm", address, "--count", str(per_process), "--base", str(k * per_process),
                  "--backend", "trio" if k % 2 else "asyncio")
            for k in range(processes)
        ]
        procs += storms
        for s in storms:
            s.expect(lambda m: "started" in m, "a storm process")
        wait_for(lambda: b1.stats()["connections"] == total, "all clients on the first broker")

        b1.signal(signal.SIGKILL)
        b1.popen.wait(timeout=10)
        b2 = BrokerProc(path, backend="trio")
        procs.append(b2)
        # All 100 notice at once and come back within their backoff (at most 0.5 s apart).
        wait_for(lambda: b2.stats()["connections"] == total, "all clients on the new broker")
        for s in storms:
            wait_for(lambda s=s: s.report()["connected"] == per_process, "every client ready")  # type: ignore[misc]
            assert all(n == 2 for n in s.report()["connects"])

        w = Child("worker", address, "--id", "1000")
        procs.append(w)
        w.expect(_ready, "a publisher")
        w.send("publish", 5, "hello")
        for s in storms:
            wait_for(lambda s=s: all(n == 5 for n in s.report()["received"]), "all 100 to receive")  # type: ignore[misc]
        stats = b2.stats()
        assert_identity(stats)
        assert stats["router"]["dropped"] == 0
        assert stats["protocol_errors"] == 0
        rss = b2.peak_rss()
        print(f"\nreconnect storm: {total} clients, new broker peak RSS {rss / 2**20:.1f} MiB")
        assert rss < RSS_CEILING
