"""Hosts that are really apart: each node and the engine in a network namespace of its
own, joined by veth pairs, and one node's link cut mid-stream (docs/cluster.md).

Needs root and iproute2; creates and removes its own namespaces (random names) and only
uses addresses inside them (10.201.x.0/30). Workers reach their broker over its Unix
socket (path sockets are not per network namespace); the brokers reach the NATS server
over the veth links only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest

from .cluster_kit import Node, cluster_dir
from .test_cluster import _lost_from, _wait_count

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"), reason="needs root and iproute2"),
    pytest.mark.skipif(not shutil.which("nats-server"), reason="needs nats-server (scripts/setup.sh)"),
]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@contextmanager
def _namespaces() -> Iterator[dict[str, str]]:
    tag = os.urandom(3).hex()
    names = {"engine": f"wbE{tag}", "node0": f"wbA{tag}", "node1": f"wbB{tag}"}
    made: list[str] = []
    try:
        for ns in names.values():
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        for i, node in enumerate(("node0", "node1")):
            outer, inner = f"ve{i}{tag}", f"vn{i}{tag}"
            _ip("link", "add", outer, "netns", names["engine"], "type", "veth", "peer", "name", inner, "netns", names[node])
            _ip("-n", names["engine"], "addr", "add", f"10.201.{i}.1/30", "dev", outer)
            _ip("-n", names[node], "addr", "add", f"10.201.{i}.2/30", "dev", inner)
            _ip("-n", names["engine"], "link", "set", outer, "up")
            _ip("-n", names[node], "link", "set", inner, "up")
            names[f"link{i}"] = inner
        yield names
    finally:
        for ns in made:  # deleting a namespace deletes its veth ends too
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=10)


def _start_engine(kind: str, names: dict[str, str], workdir: str, stack: ExitStack) -> str:
    """Run the engine server in the engine's namespace until ``stack`` closes; the URL
    node ``i`` reaches it at, with ``{}`` for ``i``."""
    if kind == "nats":
        server, url = ["nats-server", "-a", "0.0.0.0", "-p", "4222"], "nats://10.201.{}.1:4222"
    else:
        server = ["redis-server", "--bind", "0.0.0.0", "--port", "6379", "--protected-mode", "no",
                  "--save", "", "--appendonly", "no"]
        url = "redis://10.201.{}.1:6379"
    log = open(os.path.join(workdir, f"{kind}.log"), "wb")
    stack.callback(log.close)
    proc = subprocess.Popen(["ip", "netns", "exec", names["engine"], *server], stdout=log, stderr=log)

    def stop() -> None:
        proc.kill()
        proc.wait()

    stack.callback(stop)
    return url


def test_a_partitioned_node_keeps_its_local_bus_and_loses_nothing_silently() -> None:
    with cluster_dir() as workdir, _namespaces() as names, ExitStack() as stack:
        url = _start_engine("nats", names, workdir, stack)
        nodes = []
        for i, name in enumerate(("node0", "node1")):
            n = Node(name, workdir, url.format(i), "asyncio", wrap=("ip", "netns", "exec", names[name]))
            stack.callback(n.close)
            nodes.append(n)
        for n in nodes:
            n.wait_bridge(lambda b: b["engine_connected"])
        a, b = nodes
        wa = a.start_workers(1)[0]
        wb = b.start_workers(1)[0]
        wa.publish("warm", 1, scope="cluster")
        _wait_count(wb, "warm", 1)

        # a stream from each side, then A's link goes down mid-stream
        wa.command(op="publish", event="fromA", n=2000, scope="cluster")
        wb.command(op="publish", event="fromB", n=2000, scope="cluster")
        _wait_count(wb, "fromA", 20)
        _ip("-n", names["node0"], "link", "set", names["link0"], "down")
        try:
            a.wait_bridge(lambda s: not s["engine_connected"], timeout=30)
            # A's local bus carries on, cut off from the engine
            wa.publish("localA", 5)
            assert len(_wait_count(wa, "localA", 5)) == 5
            wa.publish("duringA", 20, scope="cluster")
            wb.publish("duringB", 20, scope="cluster")
        finally:
            _ip("-n", names["node0"], "link", "set", names["link0"], "up")
        for n in nodes:
            n.wait_bridge(lambda s: s["engine_connected"] and s["buffered"] == 0, timeout=30)
        wa.publish("endA", 5, scope="cluster")
        wb.publish("endB", 5, scope="cluster")
        _wait_count(wb, "endA", 5)
        _wait_count(wa, "endB", 5)
        # every cluster event either arrived (in order, once) or was reported lost, both ways
        for receiver, sender_node, prefix in ((wb, "node0", "A"), (wa, "node1", "B")):
            got = 0
            for event, count in ((f"from{prefix}", 2000), (f"during{prefix}", 20), (f"end{prefix}", 5)):
                seen = [e["data"]["i"] for e in receiver.received(event)]
                assert seen == sorted(set(seen)) and len(seen) <= count
                got += len(seen)
            lost = _lost_from(receiver, sender_node)
            print(f"partition: {prefix} -> {got} delivered, {lost} reported lost")
            assert got + lost == 2025, (prefix, got)
        assert wb.received("localA") == []


@pytest.mark.parametrize("kind", ["nats", "redis"])
def test_a_link_cut_under_a_full_socket_is_noticed_and_the_bridge_reconnects(kind: str) -> None:
    # The link goes down while the node floods the engine: the bytes pile up in the socket
    # and nothing fails on the node's side. NATS: nats-py's keepalive sees it, but its
    # orderly close (write what is buffered, wait until it was sent) cannot end while the
    # link is down, and its callbacks come after it; the engine watches the client's state
    # and aborts the socket. Redis: redis-py has no keepalive of its own; the engine pings
    # over its subscription (shared/bridges/{nats,redis}.py).
    if kind == "redis" and not shutil.which("redis-server"):
        pytest.skip("needs redis-server (scripts/setup.sh)")
    with cluster_dir() as workdir, _namespaces() as names, ExitStack() as stack:
        url = _start_engine(kind, names, workdir, stack).format(0)
        node = Node("node0", workdir, url, "asyncio", wrap=("ip", "netns", "exec", names["node0"]))
        stack.callback(node.close)
        node.wait_bridge(lambda b: b["engine_connected"])
        (worker,) = node.start_workers(1)
        _ip("-n", names["node0"], "link", "set", names["link0"], "down")
        try:
            worker.publish("flood", 3000, scope="cluster", pad=2000)  # ~6 MB: more than a socket holds
            node.wait_bridge(lambda s: not s["engine_connected"], timeout=30)
        finally:
            _ip("-n", names["node0"], "link", "set", names["link0"], "up")
        node.wait_bridge(lambda s: s["engine_connected"] and s["reconnects"] >= 1, timeout=30)
