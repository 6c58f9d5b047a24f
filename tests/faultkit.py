"""Real processes for the fault-injection tests: a broker, controllable workers, raw peers.

The parent side (used by tests/test_faults*.py and tests/test_access*.py):

- :class:`BrokerProc` runs ``workerbus broker`` as a user would, with ``--stats-listen``, so
  every count is read from the outside (``/stats``) and memory from ``/proc/<pid>/status``.
- :class:`Child` runs this module as a worker process (``python -m tests.faultkit worker``)
  that takes commands on stdin and answers JSON lines on stdout.

Every wait is bounded by a deadline; every process is started in its own session and
killed (whole process group) by :func:`reap` even when a test fails.

The child side (``main``): ``worker`` (one Client), ``storm`` (many Clients in one
process), ``raw`` (a hand-made peer that stops in the middle of a frame).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
#: Seconds any single wait in these tests may take before it is a failure.
DEADLINE = 20.0

Message = dict[str, Any]


# --- parent side ---------------------------------------------------------------------------


class _Proc:
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signum)

    def kill(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=DEADLINE)

    def alive(self) -> bool:
        return self.popen.poll() is None


class BrokerProc(_Proc):
    """``workerbus broker --listen unix:PATH --stats-listen unix:PATH.stats ...``."""

    def __init__(self, path: str, *args: str, backend: str = "asyncio", wait: bool = True) -> None:
        self.path = path
        self.stats_path = path + ".stats"
        self.log_path = f"{path}.{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")
        cmd = [
            PY, "-m", "shared.tools.cli", "broker", "--listen", f"unix:{path}",
            "--stats-listen", f"unix:{self.stats_path}", "--backend", backend, "--log-level", "INFO", *args,
        ]
        self.popen = subprocess.Popen(
            cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, start_new_session=True
        )
        if wait:
            self.wait_serving()

    def wait_serving(self) -> None:
        def ready() -> bool:
            if not self.alive():
                raise AssertionError(f"broker exited early:\n{self.log()}")
            return _accepting(self.stats_path)  # a killed predecessor's file may still be there

        wait_for(ready, "broker to serve")

    def stats(self) -> Message:
        from shared.tools.statsserver import fetch_stats

        doc: Message = json.loads(fetch_stats(f"unix:{self.stats_path}", as_json=True))
        return doc

    def queue(self, worker_id: int) -> Message:
        for q in self.stats()["router"]["queues"]:
            if q["worker_id"] == worker_id:
                return dict(q)
        raise KeyError(worker_id)

    def peak_rss(self) -> int:
        from shared.stats import process_memory

        mem = process_memory(self.pid)
        assert mem is not None
        return mem.peak

    def log(self) -> str:
        self._log.flush()
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self) -> int:
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=DEADLINE)
        finally:
            self.kill()

    def kill(self) -> None:
        super().kill()
        self._log.close()


class Child(_Proc):
    """This module run as a child; commands in on stdin, JSON lines out on stdout."""

    def __init__(self, mode: str, *args: str) -> None:
        self.popen = subprocess.Popen(
            [PY, "-m", "tests.faultkit", mode, *args],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.messages: queue.Queue[Message] = queue.Queue()
        self.seen: list[Message] = []
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        with self.popen.stdout:
            for line in self.popen.stdout:
                with contextlib.suppress(ValueError):
                    self.messages.put(json.loads(line))

    def kill(self) -> None:
        super().kill()
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        self._pump_thread.join(timeout=DEADLINE)

    def send(self, *words: object) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write((" ".join(map(str, words)) + "\n").encode())
        self.popen.stdin.flush()

    def expect(self, predicate: Callable[[Message], bool], what: str, timeout: float = DEADLINE) -> Message:
        """The first message (from now on, or already seen) that matches."""
        for msg in self.seen:
            if predicate(msg):
                self.seen.remove(msg)
                return msg
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}; alive={self.alive()}")
            try:
                msg = self.messages.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if predicate(msg):
                return msg
            self.seen.append(msg)

    def report(self) -> Message:
        """Ask for, and return, the child's counters."""
        self.send("report")
        return self.expect(lambda m: "report" in m, "a report")["report"]  # type: ignore[no-any-return]


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    """Poll ``predicate`` every 20 ms until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _accepting(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


@contextlib.contextmanager
def reap() -> Iterator[list[_Proc]]:
    """Collect processes; kill every one of them (process group) on the way out."""
    procs: list[_Proc] = []
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()


def assert_identity(stats: Message) -> None:
    """Every frame the router offered is sent, dropped, queued or in flight (per queue too)."""
    router = stats["router"]
    for q in router["queues"]:
        assert q["routed"] == q["sent"] + q["dropped"] + q["depth"] + q["in_flight"], q
    assert router["routed"] == (router["sent"] + router["dropped"] + router["abandoned"] + router["queued"]
                                + router["in_flight"]), router


# --- child side ----------------------------------------------------------------------------


def _emit(msg: Message) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


async def _commands() -> Any:
    import anyio

    while True:
        line = await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        if not line:
            return
        yield line.split()


class _Tally:
    """What one worker received: counts per event name, order and gaps per publisher."""

    def __init__(self) -> None:
        self.received = 0
        self.by_event: dict[str, int] = {}
        self.last: dict[str, int] = {}
        self.out_of_order = 0
        self.notices: list[Any] = []

    def __call__(self, data: Any, event: str, source: str, wid: int | None) -> None:
        if source == "workerbus":
            self.notices.append({"event": event, "data": data})
            return
        self.received += 1
        self.by_event[event] = self.by_event.get(event, 0) + 1
        if isinstance(data, int):
            if data <= self.last.get(event, -1):
                self.out_of_order += 1
            self.last[event] = data


async def _worker(args: argparse.Namespace) -> None:
    import anyio

    from shared.client import Client
    from shared.errors import PublishBufferFull
    from shared.transportnames import load_transport

    tally = _Tally()
    async with Client(
        args.address, transport=load_transport(args.transport), worker_id=args.id, max_buffer_len=args.buffer,
        max_queue_len=args.inbox,
    ) as bus:
        bus.subscribe("*", "*", tally)

        async def slow(data: Any, event: str, source: str, wid: int | None) -> None:
            _emit({"handler": "start"})
            await anyio.sleep(float(data))
            _emit({"handler": "end"})

        bus.subscribe("fault", "slow", slow)
        await bus.wait_ready()
        _emit({"ready": args.id})
        async for words in _commands():
            cmd = words[0]
            if cmd == "publish":  # publish COUNT EVENT [TARGET [START]]: data = START..START+COUNT-1
                count, event = int(words[1]), words[2]
                target = words[3] if len(words) > 3 else "all"
                start = int(words[4]) if len(words) > 4 else 0
                refused = 0
                for i in range(start, start + count):
                    try:
                        await bus.publish("fault", event, i, target)
                    except PublishBufferFull:
                        refused += 1
                    if i % 100 == 99 and bus.is_ready:
                        with anyio.move_on_after(1.0):  # a broker that dies meanwhile
                            await bus.flush()
                _emit({"published": count, "refused": refused})
            elif cmd == "slow":  # slow SECONDS TARGET
                await bus.publish("fault", "slow", float(words[1]), words[2])
                _emit({"published": 1})
            elif cmd == "flood":  # flood SECONDS: publish as fast as possible
                end = time.monotonic() + float(words[1])
                n = refused = 0
                while time.monotonic() < end:
                    for _ in range(100):
                        try:
                            await bus.publish("fault", "flood", n)
                        except PublishBufferFull:  # no broker and the buffer is full
                            refused += 1
                            await anyio.sleep(0.001)
                        n += 1
                _emit({"flooded": n, "refused": refused})
            elif cmd == "flush":
                await bus.flush()
                _emit({"flushed": True})
            elif cmd == "report":
                st = bus.statistics()
                _emit({"report": {
                    "received": tally.received, "by_event": tally.by_event,
                    "out_of_order": tally.out_of_order, "notices": tally.notices,
                    "connected": st.connected, "published": st.published, "sent": st.sent,
                    "buffered": st.buffered, "dropped": st.dropped,
                    "dropped_by_broker": st.dropped_by_broker, "connects": st.connects,
                    "delivered": st.delivered,
                }})
            elif cmd == "exit":
                break


async def _storm(args: argparse.Namespace) -> None:
    import anyio

    import httpbus
    from shared.client import Client

    counts = [0] * args.count

    def counter(i: int) -> Callable[[Any, str, str, int | None], None]:
        def handle(data: Any, event: str, source: str, wid: int | None) -> None:
            if source != "workerbus":
                counts[i] += 1

        return handle

    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for i in range(args.count):
            c = await stack.enter_async_context(Client(args.address, transport=httpbus.TRANSPORT, worker_id=args.base + i))
            c.subscribe("*", "*", counter(i))
            clients.append(c)
        _emit({"started": args.count})
        async for words in _commands():
            if words[0] == "report":
                _emit({"report": {
                    "connected": sum(c.is_ready for c in clients),
                    "connects": [c.statistics().connects for c in clients],
                    "received": counts,
                }})
            elif words[0] == "exit":
                break
        await anyio.lowlevel.checkpoint()


def _raw(args: argparse.Namespace) -> None:
    """Handshake, hello, one whole publish, then half a frame; then wait to be killed."""
    from httpbus.handshake import REQUEST
    from shared.frame import encode_frame
    from shared.messages import OTHERS, encode_event, encode_hello, encode_publish
    from shared.profile import NATIVE

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(args.address[len("unix:") :])
    sock.sendall(REQUEST)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise SystemExit("closed during the handshake")
        head += chunk
    event = encode_event(NATIVE, "fault", "raw", 1, args.id)
    # "others": nothing comes back to this peer, so its socket holds no unread data when
    # it dies and the broker sees a clean EOF in the middle of a frame (with unread data
    # the kernel reports a reset instead; the broker drops the connection either way).
    whole = encode_frame(encode_publish(NATIVE, OTHERS, event))
    sock.sendall(encode_frame(encode_hello(NATIVE, args.id, os.getpid())) + whole + whole[: len(whole) // 2])
    _emit({"mid_frame": True})
    # On purpose: the peer stays alive, stopped inside its frame, until the test kills it
    # (the kill is the fault under test; the bound only reaps a peer a test forgot).
    time.sleep(DEADLINE * 3)


def main(argv: list[str] | None = None) -> None:
    import anyio

    parser = argparse.ArgumentParser(prog="faultkit")
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("worker")
    p.add_argument("address")
    p.add_argument("--id", type=int, required=True)
    p.add_argument("--transport", default="http")
    p.add_argument("--buffer", type=int, default=10240)
    p.add_argument("--inbox", type=int, default=10240)
    p.add_argument("--backend", default="asyncio")
    p = sub.add_parser("storm")
    p.add_argument("address")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--base", type=int, required=True)
    p.add_argument("--backend", default="asyncio")
    p = sub.add_parser("raw")
    p.add_argument("address")
    p.add_argument("--id", type=int, required=True)
    args = parser.parse_args(argv)
    if args.mode == "raw":
        _raw(args)
    else:
        anyio.run({"worker": _worker, "storm": _storm}[args.mode], args, backend=args.backend)


if __name__ == "__main__":
    main()
