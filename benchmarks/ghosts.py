"""Ghost ids: do departed ids make every broadcast slower, and pin the broker's memory?

    python -m benchmarks.ghosts [--ghosts 1000] [--events 20000] [--transport http]

A real ``workerbus broker`` process, a subscriber (id 0) and two publishers (ids 1, 2) on
raw sockets. One round: both publishers send ``--events`` publishes to ``all`` at once;
the round ends when every reader has seen all of them (delivered, or reported dropped by
the broker). Rounds:

1. baseline, no ghosts (median of ``--rounds``);
2. right after ``--ghosts`` connections each said hello with a new id and left (their
   queues are still within the broker's broadcast grace), once per round, each time with
   new ids (median);
3. ``--ghost-wait`` seconds after the ghosts (by default past the broadcast grace; median);
4. the broker's resident memory once the queue grace (``--queue-grace``) is over.

Prints one line per phase and the ratios to phase 1; ``--json FILE`` writes them too.
The subscriber and publishers read in Python threads and keep the publishers within a
window of the slowest reader, so a round measures routing, not the overflow policy.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time

from benchmarks.rawpeers import (
    Reader,
    broadcast_list,
    connect,
    cpu_seconds,
    hello,
    rss_mib,
    start_broker,
)

CHUNK = 500
#: Publishes a publisher may have ahead of the slowest reader: the two publishers together
#: stay under the broker's default queue length, so a round measures routing, not drops.
WINDOW = 4000


def _publish(sock: socket.socket, frames: list[bytes], readers: list[Reader], base: list[int], sent: list[int]) -> None:
    for start in range(0, len(frames), CHUNK):
        while min(r.seen() - b for r, b in zip(readers, base, strict=True)) < sum(sent) - 2 * WINDOW:
            time.sleep(0.0005)
        chunk = frames[start : start + CHUNK]
        sock.sendall(b"".join(chunk))
        with _LOCK:
            sent.append(len(chunk))


_LOCK = threading.Lock()


def one_round(readers: list[Reader], pubs: list[socket.socket], frames: list[bytes], timeout: float = 300) -> float:
    """Both publishers send ``frames``; seconds until every reader saw all of them."""
    base = [r.seen() for r in readers]
    expected = len(pubs) * len(frames)
    sent: list[int] = []
    t0 = time.perf_counter()
    senders = [threading.Thread(target=_publish, args=(s, frames, readers, base, sent)) for s in pubs]
    for t in senders:
        t.start()
    deadline = t0 + timeout
    while any(r.seen() - b < expected for r, b in zip(readers, base, strict=True)):
        if time.perf_counter() > deadline:
            raise TimeoutError(f"round incomplete: {[r.seen() - b for r, b in zip(readers, base, strict=True)]} of {expected}")
        time.sleep(0.002)
    elapsed = time.perf_counter() - t0
    for t in senders:
        t.join()
    dropped = sum(r.dropped for r in readers)
    if dropped:
        print(f"   (the broker reported {dropped} events dropped for the readers so far)")
    return elapsed


def median(values: list[float]) -> float:
    return statistics.median(values)


class Meter:
    """Wall time and broker CPU time of rounds (CPU: less disturbed by a busy machine)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.walls: list[float] = []
        self.cpu = 0.0

    def round(self, readers: list[Reader], pubs: list[socket.socket], frames: list[bytes]) -> None:
        cpu0 = cpu_seconds(self.pid)
        self.walls.append(one_round(readers, pubs, frames))
        self.cpu += cpu_seconds(self.pid) - cpu0

    @property
    def wall(self) -> float:
        return median(self.walls)

    @property
    def cpu_per_round(self) -> float:
        return self.cpu / len(self.walls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ghosts", type=int, default=1000)
    ap.add_argument("--events", type=int, default=20000, help="publishes per publisher per round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per measurement (the median is reported)")
    ap.add_argument("--transport", choices=("http", "stream"), default="http")
    ap.add_argument("--queue-grace", type=float, default=10.0, help="the broker's --queue-grace")
    ap.add_argument("--ghost-wait", type=float, default=6.0,
                    help="seconds between the ghosts and phase 3 (default: past the broadcast grace)")
    ap.add_argument("--broker-arg", action="append", default=[], help="extra broker option (repeatable)")
    ap.add_argument("--json", default=None, metavar="FILE")
    args = ap.parse_args()

    extra = ["--queue-grace", str(args.queue_grace), "--log-level", "WARNING", *args.broker_arg]
    results: dict[str, float] = {}
    with start_broker(*extra, transport=args.transport) as broker:
        socks = []
        for wid in (0, 1, 2):
            s = connect(broker.path, args.transport)
            s.sendall(hello(wid))
            socks.append(s)
        readers = [Reader(s) for s in socks]
        for r in readers:
            r.start()
        frames = broadcast_list(args.events)
        pubs = [socks[1], socks[2]]
        results["rss_start_mib"] = rss_mib(broker.pid)
        one_round(readers, pubs, frames)  # warm-up
        phase1 = Meter(broker.pid)
        for _ in range(args.rounds):
            phase1.round(readers, pubs, frames)
        results["round1_s"], results["round1_cpu_s"] = phase1.wall, phase1.cpu_per_round
        results["rss_baseline_mib"] = rss_mib(broker.pid)
        print(f"1. no ghosts:                {phase1.wall:.3f} s per round, broker CPU {phase1.cpu_per_round:.3f} s; "
              f"broker RSS {results['rss_baseline_mib']:.1f} MiB")

        def storm(first_id: int) -> float:
            t0 = time.perf_counter()
            for i in range(args.ghosts):
                g = connect(broker.path, args.transport)
                g.sendall(hello(first_id + i))
                g.close()
            deadline = time.monotonic() + 60
            while broker.stats()["connections"] != 3:
                if time.monotonic() > deadline:
                    raise TimeoutError("ghosts still connected after 60 s")
                time.sleep(0.05)
            return time.perf_counter() - t0

        # Phase 2, ``--rounds`` times: a storm of new ghost ids, then at once one round.
        storms = []
        phase2 = Meter(broker.pid)
        for r in range(args.rounds):
            storms.append(storm(100_000 + r * args.ghosts))
            ghosts_done = time.perf_counter()
            phase2.round(readers, pubs, frames)
        results["ghosts_s"] = median(storms)
        results["round2_s"], results["round2_cpu_s"] = phase2.wall, phase2.cpu_per_round
        results["rss_round2_mib"] = rss_mib(broker.pid)
        print(f"   {args.ghosts} ghosts connect, say hello and leave in {results['ghosts_s']:.2f} s")
        print(f"2. right after the ghosts:   {phase2.wall:.3f} s per round, broker CPU {phase2.cpu_per_round:.3f} s; "
              f"broker RSS {results['rss_round2_mib']:.1f} MiB")
        time.sleep(max(0.0, args.ghost_wait - (time.perf_counter() - ghosts_done)))
        phase3 = Meter(broker.pid)
        for _ in range(args.rounds):
            phase3.round(readers, pubs, frames)
        results["round3_s"], results["round3_cpu_s"] = phase3.wall, phase3.cpu_per_round
        results["rss_round3_mib"] = rss_mib(broker.pid)
        router = broker.stats()["router"]
        assert isinstance(router, dict)
        results["queues_phase3"] = len(router["queues"])
        results["ghost_depth_phase3"] = sum(q["depth"] for q in router["queues"] if q["worker_id"] >= 100_000)
        results["queues_departed"] = router.get("queues_departed", -1)
        results["queues_muted"] = router.get("queues_muted", -1)
        print(
            f"3. {args.ghost_wait:g} s after the ghosts:  {phase3.wall:.3f} s per round, broker CPU "
            f"{phase3.cpu_per_round:.3f} s; broker RSS "
            f"{results['rss_round3_mib']:.1f} MiB; queues {results['queues_phase3']:g} (departed "
            f"{results['queues_departed']:g}, muted {results['queues_muted']:g}; frames queued for ghosts "
            f"{results['ghost_depth_phase3']:g})"
        )
        time.sleep(max(0.0, args.queue_grace + 2.5 - (time.perf_counter() - ghosts_done)))
        results["rss_after_expiry_mib"] = rss_mib(broker.pid)
        results["rss_peak_mib"] = rss_mib(broker.pid, "VmHWM")
        router = broker.stats()["router"]
        assert isinstance(router, dict)
        results["queues_after_expiry"] = len(router["queues"])
        identity = router["routed"] == router["sent"] + router["dropped"] + router["queued"] + router["in_flight"]
        print(
            f"4. after the queue grace:    broker RSS {results['rss_after_expiry_mib']:.1f} MiB "
            f"(peak {results['rss_peak_mib']:.1f}); queues left {results['queues_after_expiry']}; "
            f"accounting identity holds: {identity}"
        )
        results["ratio_right_after"] = results["round2_s"] / results["round1_s"]
        results["ratio_later"] = results["round3_s"] / results["round1_s"]
        results["cpu_ratio_right_after"] = results["round2_cpu_s"] / results["round1_cpu_s"]
        results["cpu_ratio_later"] = results["round3_cpu_s"] / results["round1_cpu_s"]
        print(
            f"ratio to no ghosts, wall time: right after {results['ratio_right_after']:.2f}x, "
            f"later {results['ratio_later']:.2f}x; broker CPU: right after {results['cpu_ratio_right_after']:.2f}x, "
            f"later {results['cpu_ratio_later']:.2f}x; RSS after expiry - baseline: "
            f"{results['rss_after_expiry_mib'] - results['rss_baseline_mib']:+.1f} MiB"
        )
        for s in socks:
            s.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
