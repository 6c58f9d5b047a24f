"""The cluster bridge with real engines (nats-server, redis-server), real brokers with
``--bridge`` and real worker processes: several nodes on this machine (docs/cluster.md)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from shared.bridges import make_bridge
from shared.broker import Broker

from .cluster_kit import Engine, Node, Worker, cluster_dir, engine, free_port, nodes
from .proc import stop, workerbus

pytestmark = pytest.mark.slow

ENGINES = [
    pytest.param("nats", marks=pytest.mark.skipif(not shutil.which("nats-server"), reason="needs nats-server (scripts/setup.sh)")),
    pytest.param("redis", marks=pytest.mark.skipif(not shutil.which("redis-server"), reason="needs redis-server (scripts/setup.sh)")),
]


@pytest.fixture(params=ENGINES)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def workdir() -> Iterator[str]:
    with cluster_dir() as d:
        yield d


def _lost_from(worker: Worker, node: str) -> int:
    return sum(
        e["data"]["count"]
        for e in worker.lines.events()
        if e["source"] == "workerbus" and e["event"] == "lost" and e["data"]["node"] == node
    )


def _wait_count(worker: Worker, event: str, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    worker.lines.wait(lambda items: sum(1 for i in items if "source" in i and i["event"] == event) >= count, timeout)
    return worker.received(event)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_broadcast_reaches_every_node_and_local_stays_local(kind: str, backend: str, workdir: str) -> None:
    with engine(kind, workdir) as eng, nodes(workdir, [eng.url] * 3, backend) as ns:
        for n in ns:
            n.start_workers(2)
        publishers = [n.workers[0] for n in ns]
        for p in publishers:
            # local first: a local event that leaked would reach the other nodes before
            # the cluster events of the same publisher (one order per publisher)
            p.publish("l", 5)
            p.publish("c", 20, scope="cluster")
        ns[0].workers[0].publish("o", 5, scope="cluster", target="others")
        for n in ns:
            for w in n.workers:
                got = _wait_count(w, "c", 60)
                assert len(got) == 60
                by_node = Counter(e["node"] for e in got)
                assert by_node == {None if m is n else m.name: 20 for m in ns}
                for m in ns:
                    mine = [e["data"]["i"] for e in got if e["node"] == (None if m is n else m.name)]
                    assert mine == list(range(20))  # publish order, per publisher
                _wait_count(w, "o", 0 if w is ns[0].workers[0] else 5)
                locals_ = _wait_count(w, "l", 5)
                assert len(locals_) == 5 and {e["node"] for e in locals_} == {None}
                assert {e["data"]["from"] for e in locals_} == {0}
        # after every cluster event has arrived: nothing else crossed
        for n in ns:
            for w in n.workers:
                assert len(w.received("l")) == 5
                assert len(w.received("o")) == (0 if w is ns[0].workers[0] else 5)
            b = n.bridge()
            assert b["sent"] == 20 + (5 if n is ns[0] else 0)
            assert b["received"] == 40 + (0 if n is ns[0] else 5)
            assert b["lost"] == 0 and b["dropped"] == 0 and b["engine_connected"]
        # the same numbers in Prometheus text through `workerbus stats`
        text = subprocess.run(
            workerbus("stats", ns[0].stats_address), capture_output=True, text=True, check=True
        ).stdout
        assert 'workerbus_bridge_sent_total{node="node0",' in text
        assert [line for line in text.splitlines() if line.startswith("workerbus_bridge_sent_total")][0].endswith(" 25")
        assert any(line.startswith("workerbus_bridge_engine_connected{") and line.endswith(" 1") for line in text.splitlines())


def _one_backend_per_engine(kind: str, trio_for: str) -> str:
    """Both backends for a scenario without running it twice per engine: the engine named
    runs its brokers on trio (the bridge's engine on a thread), the other on asyncio."""
    return "trio" if kind == trio_for else "asyncio"


def test_cluster_unique_from_several_nodes_is_handled_once(kind: str, workdir: str) -> None:
    keys = 10
    backend = _one_backend_per_engine(kind, trio_for="nats")
    with engine(kind, workdir) as eng, nodes(workdir, [eng.url] * 3, backend) as ns:
        for n in ns:
            n.start_workers(2)
        for n in ns:
            for k in range(keys):
                # the event name carries the key, so each key's handlers can be counted
                n.workers[0].command(op="publish", event=f"u{k}", n=1, scope="cluster", target=f"unique:k{k}")
        for n in ns:
            n.wait_bridge(lambda b: b["unique_won"] + b["unique_duplicates"] == keys)
        assert sum(n.bridge()["unique_won"] for n in ns) == keys
        all_workers = [w for n in ns for w in n.workers]
        deadline = time.monotonic() + 20
        while sum(len(w.received(f"u{k}")) for w in all_workers for k in range(keys)) < keys:
            assert time.monotonic() < deadline, "unique events never all arrived"
            time.sleep(0.02)
        for k in range(keys):
            handlers = [w for w in all_workers for _ in w.received(f"u{k}")]
            assert len(handlers) == 1, (k, len(handlers))  # once per key in the whole cluster


@pytest.mark.parametrize("backend", ["asyncio", "trio"])  # engine in the broker's loop / on a thread
def test_engine_killed_mid_stream(kind: str, backend: str, workdir: str) -> None:
    with engine(kind, workdir) as eng, nodes(workdir, [eng.url] * 2, backend) as ns:
        sender = ns[0].start_workers(1)[0]
        receiver = ns[1].start_workers(1)[0]
        total = 3000
        sender.command(op="publish", event="m", n=total, scope="cluster")
        _wait_count(receiver, "m", 50)
        eng.kill()
        sender.lines.wait(lambda items: any(i.get("published") == total for i in items))
        for n in ns:
            n.wait_bridge(lambda b: not b["engine_connected"])
        # the local bus carries on while the engine is away
        sender.publish("local", 5)
        assert len(_wait_count(sender, "local", 5)) == 5
        sender.publish("during", 50, scope="cluster")
        ns[0].wait_bridge(lambda b: b["buffered"] >= 50)
        eng.start()
        for n in ns:
            n.wait_bridge(lambda b: b["engine_connected"] and b["buffered"] == 0 and b["reconnects"] >= 1)
        sender.publish("z", 10, scope="cluster")
        _wait_count(receiver, "z", 10)
        got_m = [e["data"]["i"] for e in receiver.received("m")]
        got_d = [e["data"]["i"] for e in receiver.received("during")]
        assert got_m == sorted(set(got_m)), "out of order or duplicated"
        # Buffered during the outage, sent on reconnect: the receiving node may reconnect
        # later than the sender and miss some of them (pub/sub is at-most-once); whatever
        # it missed is reported, nothing arrives out of order.
        assert got_d == sorted(set(got_d))
        assert ns[0].bridge()["sent"] >= 50 + 10
        lost = _lost_from(receiver, "node0")
        assert len(got_m) + len(got_d) + 10 + lost == total + 50 + 10, (len(got_m), len(got_d), lost)
        assert ns[1].bridge()["lost"] == lost
        assert receiver.received("local") == []
        assert len(receiver.received("z")) == 10


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_brokers_stop_at_once_with_the_engine_up_or_away(kind: str, backend: str, workdir: str) -> None:
    # On trio the engine runs on a thread that the broker must end: while connected, and
    # while the engine is away (the driver reconnecting). A stuck engine thread would cost
    # the broker's 5 s join; the broker exits 0 with nothing logged as an error.
    with engine(kind, workdir) as eng, nodes(workdir, [eng.url] * 2, backend) as ns:
        receiver = ns[1].start_workers(1)[0]
        ns[0].start_workers(1)[0].publish("a", 10, scope="cluster")
        _wait_count(receiver, "a", 10)
        stopped = [_stop_in_time(ns[0])]
        eng.kill()
        ns[1].wait_bridge(lambda b: not b["engine_connected"])
        stopped.append(_stop_in_time(ns[1]))
    for log in stopped:
        assert "Traceback" not in log and "ERROR" not in log and "failed" not in log, log


def _stop_in_time(node: Node) -> str:
    for w in node.workers:  # (a worker left without its broker waits for it)
        w.close()
    node.workers = []
    start = time.monotonic()
    assert stop(node.proc) == 0
    assert time.monotonic() - start < 4.0, "the broker took the engine thread's join timeout to stop"
    with open(node.log.name, encoding="utf-8") as f:
        return f.read()


@pytest.mark.skipif(not shutil.which("nats-server"), reason="needs nats-server (scripts/setup.sh)")
def test_nats_cluster_of_two_servers(workdir: str) -> None:
    port_a, port_b = free_port(), free_port()
    a = Engine("nats", workdir, cluster_port=port_a, routes=[port_b], js=False)
    b = Engine("nats", workdir, cluster_port=port_b, routes=[port_a], js=False)
    a.start()
    try:
        b.start()
        try:
            with nodes(workdir, [a.url, b.url], "trio") as ns:  # the others run on asyncio
                w0 = ns[0].start_workers(1)[0]
                w1 = ns[1].start_workers(1)[0]
                # the servers exchange routes and interest asynchronously: probe until an
                # event crosses in both directions (bounded), then measure
                for src, dst, name in ((w0, w1, "p0"), (w1, w0, "p1")):
                    for attempt in range(50):
                        src.publish(name, 1, scope="cluster")
                        try:
                            _wait_count(dst, name, 1, timeout=0.5)
                            break
                        except TimeoutError:
                            assert attempt < 49, "the NATS route never carried an event"
                w0.publish("x", 100, scope="cluster")
                w1.publish("y", 100, scope="cluster")
                assert [e["data"]["i"] for e in _wait_count(w1, "x", 100)] == list(range(100))
                assert [e["data"]["i"] for e in _wait_count(w0, "y", 100)] == list(range(100))
                assert {e["node"] for e in w1.received("x")} == {"node0"}
        finally:
            b.kill()
    finally:
        a.kill()


def test_outbox_overflow_is_counted_and_reported(kind: str, workdir: str) -> None:
    backend = _one_backend_per_engine(kind, trio_for="redis")
    with engine(kind, workdir) as eng, nodes(workdir, [eng.url] * 2, backend, extra=("--bridge-buffer", "10")) as ns:
        sender = ns[0].start_workers(1)[0]
        receiver = ns[1].start_workers(1)[0]
        sender.publish("a", 3, scope="cluster")
        _wait_count(receiver, "a", 3)
        eng.kill()
        for n in ns:
            n.wait_bridge(lambda b: not b["engine_connected"])
        sender.publish("b", 30, scope="cluster")
        b = ns[0].wait_bridge(lambda b: b["buffered"] == 10 and b["dropped"] == 20)
        assert b["sent"] == 3
        eng.start()
        for n in ns:
            n.wait_bridge(lambda b: b["engine_connected"] and b["buffered"] == 0)
        sender.publish("z", 1, scope="cluster")
        _wait_count(receiver, "z", 1)
        got_b = [e["data"]["i"] for e in receiver.received("b")]
        # the 10 kept are the first 10 (drop newest), in order; every other one is reported
        assert got_b == sorted(got_b) and set(got_b) <= set(range(10))
        assert len(got_b) + _lost_from(receiver, "node0") == 30
        with open(ns[0].log.name, encoding="utf-8") as f:
            log = f.read()
        # one line when the outage starts, one when it ends; the overflow is rate-limited
        assert log.count("bridge of node node0 lost") == 1, log
        assert log.count("reached") == 1, log
        assert 1 <= log.count("bridge outbox full") <= 10


def test_an_engine_down_at_start_is_said_once_with_the_why(kind: str, workdir: str) -> None:
    # Until session 5 a NATS bridge started with its server down said nothing at all:
    # nats-py retried inside connect() forever. Both engines now give up on the attempt,
    # the node logs one WARNING with the reason, buffers, and says when it got through.
    backend = _one_backend_per_engine(kind, trio_for="redis")
    eng = Engine(kind, workdir)  # not started yet: nothing listens at its address
    node = Node("node0", workdir, eng.url, backend)
    try:
        sender = node.start_workers(1)[0]
        sender.publish("early", 5, scope="cluster")
        node.wait_bridge(lambda b: b["buffered"] == 5 and not b["engine_connected"])
        eng.start()
        # (an event taken out of the outbox is counted as sent once the engine took it:
        # in between it is neither buffered nor sent, so wait for where all five ended up)
        b = node.wait_bridge(lambda b: b["engine_connected"] and b["buffered"] == 0 and b["sent"] + b["dropped"] == 5)
        assert b["sent"] == 5
        node.close()
        with open(node.log.name, encoding="utf-8") as f:
            log = f.read()
        (line,) = [x for x in log.splitlines() if "cannot reach" in x]
        assert "WARNING" in line
        # the why, not just a type: refused (TCP) or no such socket (Unix)
        assert "refused" in line.lower() or "no such file" in line.lower(), line
        assert log.count("reached") == 1, log
    finally:
        node.close()
        eng.kill()


def test_a_refused_cluster_unique_claim_is_dropped_counted_and_said(kind: str, workdir: str) -> None:
    # Until session 5 each refused claim ended the engine session and reconnected at once,
    # forever (~1000 WARNING lines a second) with the claim stuck at the outbox's head.
    # Refusals: NATS without JetStream; Redis with SET renamed away (as an ACL would).
    refusing = {"js": False} if kind == "nats" else {"extra": ("--rename-command", "SET", "")}
    backend = _one_backend_per_engine(kind, trio_for="redis")
    with engine(kind, workdir, **refusing) as eng, nodes(workdir, [eng.url], backend) as (node,):
        sender = node.start_workers(1)[0]
        sender.command(op="publish", event="u", n=3, scope="cluster", target="unique:k")
        b = node.wait_bridge(lambda b: b["dropped"] == 3)
        sender.publish("after", 2, scope="cluster")
        b = node.wait_bridge(lambda b: b["sent"] == 2)
        assert b["engine_connected"] and b["reconnects"] == 0 and b["unique_won"] == 0
        assert len(_wait_count(sender, "after", 2)) == 2  # the bus and the engine carry on
        node.close()
        with open(node.log.name, encoding="utf-8") as f:
            log = f.read()
        refusals = [x for x in log.splitlines() if "refused a cluster-unique claim" in x]
        assert 1 <= len(refusals) <= 3, log
        assert ("nats-server -js" if kind == "nats" else "unknown command") in refusals[0], log
        assert "bridge of node node0 lost" not in log and "reached" not in log, log  # no reconnect


@pytest.mark.skipif(not shutil.which("nats-server"), reason="needs nats-server (scripts/setup.sh)")
def test_messages_fit_the_nats_servers_max_payload(workdir: str) -> None:
    # A server configured with a small max_payload: runs of events go out in messages
    # within it; an event too big for any message is dropped, counted and said on the
    # sending node, and reported lost on the others (it was numbered). Before session 5
    # the run was retried forever (nats-py refuses the publish; each retry the same).
    conf = os.path.join(workdir, "nats.conf")
    with open(conf, "w", encoding="utf-8") as f:
        f.write("max_payload: 4096\n")
    with engine("nats", workdir, extra=("-c", conf)) as eng, nodes(workdir, [eng.url] * 2, "asyncio") as ns:
        sender = ns[0].start_workers(1)[0]
        receiver = ns[1].start_workers(1)[0]
        sender.command(op="publish", event="fits", n=30, scope="cluster", pad=1000)
        assert len(_wait_count(receiver, "fits", 30)) == 30
        sender.publish("big", 1, scope="cluster", pad=6000)
        sender.publish("after", 1, scope="cluster")
        _wait_count(receiver, "after", 1)
        assert receiver.received("big") == []
        assert _lost_from(receiver, "node0") == 1
        b = ns[0].bridge()
        assert b["dropped"] == 1 and b["sent"] == 31 and b["reconnects"] == 0, b
        ns[0].close()
        with open(ns[0].log.name, encoding="utf-8") as f:
            log = f.read()
        assert log.count("refused an event of") == 1 and "bridge of node node0 lost" not in log, log


@pytest.mark.skipif(not shutil.which("nats-server"), reason="needs nats-server (scripts/setup.sh)")
def test_demo_with_two_nodes_checks_its_totals() -> None:
    out = subprocess.run(
        workerbus("demo", "--nodes", "2", "--workers", "2"), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "-> OK" in out.stdout and "0 lost" in out.stdout


@pytest.mark.skipif(not shutil.which("nats-server"), reason="needs nats-server (scripts/setup.sh)")
@pytest.mark.parametrize("app_changes_it", [False, True])
def test_the_switch_interval_under_trio_is_put_back_unless_changed(app_changes_it: bool, workdir: str) -> None:
    # A trio broker runs the engine on a thread and shortens the GIL switch interval
    # (process-wide) while it does; it puts the old value back when it stops, but never
    # over one the application has set in the meantime.
    async def main(url: str) -> tuple[float, float]:
        broker = Broker(transport="stream", bridge=make_bridge(url, node="n"))
        async with anyio.create_task_group() as tg:
            await tg.start(broker.serve, f"unix:{workdir}/b.sock")  # the bridge has started
            during = sys.getswitchinterval()
            if app_changes_it:
                sys.setswitchinterval(0.002)
            tg.cancel_scope.cancel()
        return during, sys.getswitchinterval()

    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        with engine("nats", workdir) as eng:
            during, after = anyio.run(main, eng.url, backend="trio")
        assert during == 0.0005
        assert after == (0.002 if app_changes_it else 0.005)
    finally:
        sys.setswitchinterval(before)
