"""Half-sent frames: can peers that stop inside a frame pin the broker's memory?

    python -m benchmarks.halfframes [--peers 1000] [--sent 65000] [--transport http]

A real ``workerbus broker`` process. ``--peers`` raw connections each say hello and then
send ``--sent`` bytes of a frame whose header announces 65,535, and stop there. Measured
from /proc: the broker's resident memory before, its peak while the peers hang (VmHWM),
and its resident memory a few seconds after every peer has been closed, by the broker
(``--frame-timeout``) or by us, whichever comes first. ``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import socket
import time

from benchmarks.rawpeers import connect, hello, rss_mib, start_broker


def wait_stable(pid: int, seconds: float, limit: float) -> float:
    """Wait until the broker's RSS has not grown for ``seconds`` (at most ``limit``)."""
    deadline = time.monotonic() + limit
    last, since = rss_mib(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = rss_mib(pid)
        if now > last + 0.1:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= seconds:
            break
    return last


def closed_by_broker(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=1000)
    ap.add_argument("--sent", type=int, default=65000, help="bytes of the 65,535-byte frame each peer sends")
    ap.add_argument("--transport", choices=("http", "stream"), default="http")
    ap.add_argument("--pieces", type=int, default=1,
                    help="send each peer's part of the frame in this many writes, after the hello")
    ap.add_argument("--hold", type=float, default=3.0, help="seconds the peers hang once all are in (at most)")
    ap.add_argument("--broker-arg", action="append", default=[], help="extra broker option (repeatable)")
    ap.add_argument("--json", default=None, metavar="FILE")
    args = ap.parse_args()

    results: dict[str, float] = {}
    extra = ["--log-level", "WARNING", "--max-connections", str(args.peers + 16), *args.broker_arg]
    with start_broker(*extra, transport=args.transport) as broker:
        # One well-behaved worker, so the baseline includes a served connection.
        worker = connect(broker.path, args.transport)
        worker.sendall(hello(0))
        time.sleep(0.5)
        results["rss_baseline_mib"] = rss_mib(broker.pid)
        attack = (65535).to_bytes(2, "big") + b"\x00" * args.sent
        peers = []
        t0 = time.perf_counter()
        for i in range(args.peers):
            s = connect(broker.path, args.transport)
            s.sendall(hello(300_000 + i))
            peers.append(s)
        # Then the frames, in pieces, every peer's first piece before any second one.
        step = -(-len(attack) // args.pieces)
        for start in range(0, len(attack), step):
            for s in peers:
                s.sendall(attack[start : start + step])
        results["connect_s"] = time.perf_counter() - t0
        results["rss_loaded_mib"] = wait_stable(broker.pid, 1.0, 20.0)
        deadline = time.monotonic() + args.hold
        while time.monotonic() < deadline and not all(closed_by_broker(s) for s in peers[-10:]):
            time.sleep(0.1)
        dropped = sum(closed_by_broker(s) for s in peers)
        results["closed_by_broker"] = dropped
        results["rss_peak_mib"] = rss_mib(broker.pid, "VmHWM")
        stats = broker.stats()
        results["frame_timeouts"] = float(stats.get("frame_timeouts", -1))  # type: ignore[arg-type]
        for s in peers:
            s.close()
        t1 = time.monotonic()
        while broker.stats()["open_connections"] != 1 and time.monotonic() < t1 + 60:
            time.sleep(0.1)
        results["close_s"] = time.monotonic() - t1
        time.sleep(2.5)  # the broker's housekeeping runs once a second
        results["rss_after_close_mib"] = rss_mib(broker.pid)
        worker.close()
    base = results["rss_baseline_mib"]
    print(f"baseline            {base:7.1f} MiB")
    print(f"{args.peers} peers in      {results['rss_loaded_mib']:7.1f} MiB ({results['rss_loaded_mib'] - base:+.1f})  "
          f"connected in {results['connect_s']:.2f} s")
    print(f"peak (VmHWM)        {results['rss_peak_mib']:7.1f} MiB ({results['rss_peak_mib'] - base:+.1f})")
    print(f"after close         {results['rss_after_close_mib']:7.1f} MiB ({results['rss_after_close_mib'] - base:+.1f})  "
          f"(the broker had closed them {results['close_s']:.1f} s after us)")
    print(f"closed by the broker: {dropped:g} of {args.peers}; frame_timeouts counted: {results['frame_timeouts']:g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
