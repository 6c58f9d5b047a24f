"""A line chat served by several processes sharing one TCP port (``SO_REUSEPORT``).

    python -m examples.chat_server --processes 4 --port 7000
    nc 127.0.0.1 7000        # several times: the kernel spreads connections over the processes

Each process accepts its own share of the connections; a line sent to any process is
published on the embedded bus (``streambus`` transport) and every process writes it to its
own clients, so everybody sees every line. On connect a client is greeted with
``hello from worker <id> pid <pid>``; lines arrive as ``[w<id>] <text>``.

The parent picks the port (``--port 0``: any free one), prints ``listening on HOST:PORT``,
starts the processes and restarts any that dies (kill one with ``kill -9``: another takes
over the bus and the chat goes on).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import anyio
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from shared.embed import join

logger = logging.getLogger("chat")

#: Longest line accepted from a chat client, in bytes.
MAX_LINE = 4096
#: Seconds a slow client may take to accept one line before it is dropped.
SEND_TIMEOUT = 2.0


async def serve_process(host: str, port: int, address: str, processes: int) -> None:
    clients: set[SocketStream] = set()

    async def fan_out(data: Any, event: str, source: str, wid: int | None) -> None:
        text = data.get("text", "") if isinstance(data, dict) else ""
        line = f"[w{wid}] {text}\n".encode()
        for client in list(clients):
            try:
                with anyio.fail_after(SEND_TIMEOUT):
                    await client.send(line)
            except (TimeoutError, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                clients.discard(client)  # its own handler notices and cleans up

    async with join(address, workers=processes, transport="stream") as bus:
        bus.subscribe("chat", "line", fan_out)

        async def handle(client: SocketStream) -> None:
            async with client:
                clients.add(client)
                try:
                    await client.send(f"hello from worker {bus.worker_id} pid {os.getpid()}\n".encode())
                    reader = BufferedByteReceiveStream(client)
                    while True:
                        raw = await reader.receive_until(b"\n", MAX_LINE)
                        text = raw.decode("utf-8", "replace").rstrip("\r")
                        if text:
                            await bus.publish("chat", "line", {"text": text})
                except (anyio.EndOfStream, anyio.IncompleteRead, anyio.DelimiterNotFound,
                        anyio.BrokenResourceError, OSError):
                    pass
                finally:
                    clients.discard(client)

        listener = await anyio.create_tcp_listener(local_host=host, local_port=port, reuse_port=True)
        logger.info("worker %d (pid %d) accepting on %s:%d", bus.worker_id, os.getpid(), host, port)
        await listener.serve(handle)


async def run_process(host: str, port: int, address: str, processes: int) -> None:
    """One chat process until SIGINT/SIGTERM (Ctrl-C reaches the whole group): stopped by
    cancellation, so the bus closes in order. A KeyboardInterrupt raised inside the loop
    would interrupt whatever task runs (asyncio then logs it at ERROR)."""
    async with anyio.create_task_group() as tg:

        async def stop_on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    break
            # (the default handlers are back: a second Ctrl-C must not break the stop)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            tg.cancel_scope.cancel()

        tg.start_soon(stop_on_signal)
        await serve_process(host, port, address, processes)


def _reserve_port(host: str, port: int) -> socket.socket:
    # Bound (not listening) with SO_REUSEPORT: it fixes the port number for the children
    # and never takes a connection itself.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def supervise(host: str, port: int, address: str, processes: int) -> int:
    reserved = _reserve_port(host, port)
    port = reserved.getsockname()[1]
    argv = [sys.executable, "-m", "examples.chat_server", "--child", "--host", host,
            "--port", str(port), "--bus", address, "--processes", str(processes)]
    children = [subprocess.Popen(argv) for _ in range(processes)]
    print(f"listening on {host}:{port}", flush=True)
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while not stopping:
            for i, child in enumerate(children):
                if child.poll() is not None and not stopping:
                    logger.warning("process %d exited (%s); starting another", child.pid, child.returncode)
                    children[i] = subprocess.Popen(argv)
            time.sleep(0.1)
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        reserved.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="a line chat over several SO_REUSEPORT processes")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7000, help="0 picks a free port")
    p.add_argument("--processes", type=int, default=4)
    default_bus = os.path.join(tempfile.gettempdir(), f"workerbus-{os.getuid()}", "chat.sock")
    p.add_argument("--bus", default=f"unix:{default_bus}", metavar="unix:PATH")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.child:
        try:
            anyio.run(run_process, args.host, args.port, args.bus, args.processes)
        except KeyboardInterrupt:  # before the loop runs
            pass
        return 0
    return supervise(args.host, args.port, args.bus, args.processes)


if __name__ == "__main__":
    sys.exit(main())
