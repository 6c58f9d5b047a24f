"""The broker's CPU per read at the latency test's rate, without client processes.

    python -m benchmarks.broker_reads [--seconds 3] [--subs 4]

Starts the broker of the tree on ``PYTHONPATH`` (``python -m shared.tools.cli broker``)
and plays, from this one process, the latency test's publisher (every 1 ms: 10 publishes
to ``others`` and a ping, in one write, as a flushing ``Client`` does) and ``--subs``
subscribers (raw sockets that ask for what the bench's clients ask for, drained after
each burst). Prints the broker's CPU time (``/proc/PID/schedstat``) per burst. With no
client processes to schedule, it varies less from run to run than
``benchmarks/lat_wakeups.py``, and it sees the broker alone: what one read costs it
(read, parse, route, one write per subscriber and the pong), not what the clients cost.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

from shared.frame import encode_frame
from shared.messages import OTHERS, encode_event, encode_hello, encode_ping, encode_publish
from shared.profile import NATIVE

SUB_CAPS = ("welcome", "barrier", "cluster", "unframed")
PUB_CAPS = ("welcome", "barrier", "cluster")


def _drain(socks: list[socket.socket]) -> None:
    for s in socks:
        try:
            while s.recv(1 << 20):
                pass
        except BlockingIOError:
            pass


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--subs", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="broker-reads") as tmp:
        path = os.path.join(tmp, "bus.sock")
        argv = [sys.executable, "-m", "shared.tools.cli", "broker", "--listen", f"unix:{path}"]
        broker = subprocess.Popen([*argv, "--transport", "stream", "--log-level", "WARNING"])
        try:
            for _ in range(1000):
                if os.path.exists(path) or broker.poll() is not None:
                    break
                time.sleep(0.01)

            def connect(worker_id: int, caps: tuple[str, ...]) -> socket.socket:
                s = socket.socket(socket.AF_UNIX)
                s.connect(path)
                s.sendall(encode_frame(encode_hello(NATIVE, worker_id, os.getpid(), caps)))
                return s

            subs = [connect(i + 1, SUB_CAPS) for i in range(args.subs)]
            pub = connect(0, PUB_CAPS)
            socks = [*subs, pub]
            time.sleep(0.3)  # the welcomes and lifecycle events
            for s in socks:
                s.setblocking(False)
            _drain(socks)
            seq = 0

            def burst() -> None:
                nonlocal seq
                frames = []
                for _ in range(10):
                    seq += 1
                    data = {"i": seq, "ts": time.time_ns()}
                    event = encode_event(NATIVE, "bench", "tick", data, None)
                    frames.append(encode_frame(encode_publish(NATIVE, OTHERS, event)))
                frames.append(encode_frame(encode_ping(NATIVE, seq)))
                pub.sendall(b"".join(frames))

            for _ in range(200):  # warm up
                burst()
                time.sleep(0.001)
            time.sleep(0.05)
            _drain(socks)
            bursts = 0
            cpu0 = _cpu_seconds(broker.pid)
            start = due = time.perf_counter()
            while time.perf_counter() - start < args.seconds:
                burst()
                bursts += 1
                due += 0.001
                time.sleep(max(0.0, due - time.perf_counter()))
                _drain(socks)
            cpu = _cpu_seconds(broker.pid) - cpu0
            print(f"{cpu * 1e6 / bursts:.1f} us broker CPU per burst ({bursts} bursts)")
        finally:
            broker.terminate()
            broker.wait()


if __name__ == "__main__":
    main()
