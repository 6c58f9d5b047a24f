"""Overload with real processes: a stuck (SIGSTOPped) subscriber and a flooding publisher.

What must hold (issue 7): a worker that stops reading slows neither the broker nor the
other workers; its queue is bounded and the overflow policy decides what is lost; every
loss is counted per worker and reported to the worker when it reads again; the broker's
memory stays bounded. Figures (events, drops, peak RSS) are printed: run with ``-s``.
"""

from __future__ import annotations

import functools
import os
import signal

import pytest

from tests.faultkit import BrokerProc, Child, Message, assert_identity, reap, wait_for

pytestmark = pytest.mark.slow

RSS_CEILING = 200 * 1024 * 1024
#: Enough that the stopped worker's socket buffer (~200 KB), the batch its writer holds
#: (256 KiB) and its queue all fill up: ~40 bytes a frame.
EVENTS = 60000
#: Large enough that the healthy worker's queue never fills even when the broker reads
#: a few socket buffers' worth of publishes (~5000 each) before its writer runs.
QUEUE = 16000
#: The burst goes out in rounds of this many events, each once the healthy worker has
#: received all earlier ones: its backlog then stays below one round (< QUEUE) however slow
#: a busy machine makes it, while the stopped worker's backlog grows to the whole burst.
ROUND = 5000


def _ready(m: Message) -> bool:
    return "ready" in m


@pytest.mark.parametrize(
    ("policy", "backend"),
    [("drop-newest", "asyncio"), ("drop-oldest", "trio"), ("disconnect", "asyncio"), ("disconnect", "trio")],
)
def test_stopped_subscriber_does_not_slow_the_others(sock_dir: str, policy: str, backend: str) -> None:
    path = os.path.join(sock_dir, "bus.sock")
    address = f"unix:{path}"
    with reap() as procs:
        broker = BrokerProc(path, "--workers", "3", "--max-queue-len", str(QUEUE), "--overflow", policy, backend=backend)
        procs.append(broker)
        # A roomy inbox: what is measured is the broker, not how fast handlers run.
        stuck = Child("worker", address, "--id", "0", "--inbox", "100000")
        healthy = Child("worker", address, "--id", "1", "--backend", "trio", "--inbox", "100000")
        publisher = Child("worker", address, "--id", "2")
        procs += [stuck, healthy, publisher]
        for w in (stuck, healthy, publisher):
            w.expect(_ready, "a worker")

        stuck.signal(signal.SIGSTOP)

        # The healthy worker gets everything while the other one is stopped. Paced by the
        # healthy worker's progress, not by the clock: what is checked is that the stopped
        # worker costs it nothing (no drop, no stall), not how fast this machine is.
        def healthy_has(n: int) -> bool:
            r = healthy.report()
            return bool(r["by_event"].get("burst", 0) + r["dropped_by_broker"] + r["dropped"] >= n)

        for start in range(0, EVENTS, ROUND):
            publisher.send("publish", ROUND, "burst", "others", start)
            publisher.expect(lambda m: "published" in m, f"events {start}.. to be published")
            wait_for(functools.partial(healthy_has, start + ROUND), f"the healthy worker to get {start + ROUND}")
        assert (healthy.report()["dropped_by_broker"], healthy.report()["dropped"]) == (0, 0)
        assert healthy.report()["by_event"]["burst"] == EVENTS
        q0 = broker.queue(0)
        assert q0["dropped"] > 0, q0
        if policy == "disconnect":
            assert q0["overflow_disconnects"] >= 1 and not q0["connected"]
        stats = broker.stats()
        assert_identity(stats)
        rss_stopped = broker.peak_rss()

        stuck.signal(signal.SIGCONT)

        def caught_up() -> bool:
            r = stuck.report()
            seen = r["received"] + r["dropped"] + r["dropped_by_broker"]
            return bool(seen >= EVENTS and broker.queue(0)["depth"] == 0)

        wait_for(caught_up, "the stopped worker to catch up")
        r = stuck.report()
        q0 = broker.queue(0)
        assert r["out_of_order"] == 0  # no duplicates, no reordering
        assert r["dropped"] == 0  # the worker's own inbox kept up
        assert r["notices"] and all(n["event"] == "dropped" for n in r["notices"])
        assert q0["routed"] == EVENTS
        assert r["dropped_by_broker"] == q0["dropped"]  # told about every drop
        if policy == "disconnect":
            # The batch being written when the connection was cut is counted as dropped;
            # the worker may still have read a prefix of it from its socket buffer.
            assert q0["sent"] <= r["received"] <= EVENTS
            assert r["connects"] >= 2
        else:
            assert r["received"] == q0["sent"]
            assert r["received"] + r["dropped_by_broker"] == EVENTS
        assert_identity(broker.stats())
        peak = broker.peak_rss()
        print(
            f"\n{policy}/{backend}: {EVENTS} events, stopped worker missed {q0['dropped']} "
            f"(told {r['dropped_by_broker']}), received {r['received']}; broker peak RSS "
            f"{peak / 2**20:.1f} MiB (while stopped {rss_stopped / 2**20:.1f} MiB)"
        )
        assert peak < RSS_CEILING


def test_flooding_publisher(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "bus.sock")
    address = f"unix:{path}"
    queue = 1000
    with reap() as procs:
        # Worker 2 is expected but never comes: its queue fills up and then drops.
        broker = BrokerProc(path, "--workers", "3", "--max-queue-len", str(queue))
        procs.append(broker)
        sub = Child("worker", address, "--id", "0", "--backend", "trio")
        pub = Child("worker", address, "--id", "1")
        procs += [sub, pub]
        sub.expect(_ready, "subscriber")
        pub.expect(_ready, "publisher")

        pub.send("flood", 2.0)
        flood = pub.expect(lambda m: "flooded" in m, "the flood")
        sent = flood["flooded"]
        assert flood["refused"] == 0
        pub.send("flush")
        pub.expect(lambda m: "flushed" in m, "the flush")

        def accounted(w: Child) -> bool:
            r = w.report()
            return bool(r["by_event"].get("flood", 0) + r["dropped_by_broker"] + r["dropped"] >= sent)

        wait_for(lambda: accounted(sub) and accounted(pub), "both workers to account for the flood")
        stats = broker.stats()
        assert stats["router"]["publishes"] == sent
        assert_identity(stats)
        for wid, worker in ((0, sub), (1, pub)):
            r, q = worker.report(), broker.queue(wid)
            assert q["routed"] == sent
            assert r["dropped_by_broker"] == q["dropped"]
            # Whatever reached the worker was handled: a full inbox stops the reading
            # (backpressure), it drops nothing.
            assert (r["by_event"]["flood"], r["dropped"]) == (q["sent"], 0)
        absent = broker.queue(2)
        assert (absent["depth"], absent["dropped"]) == (queue, sent - queue)
        peak = broker.peak_rss()
        print(
            f"\nflood: {sent} events in 2 s ({sent / 2:.0f}/s) to 2 workers + 1 absent; "
            f"dropped for the subscriber {broker.queue(0)['dropped']}, for the absent worker "
            f"{absent['dropped']}; broker peak RSS {peak / 2**20:.1f} MiB"
        )
        assert peak < RSS_CEILING
