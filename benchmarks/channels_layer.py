"""Group broadcast through Django Channels: the workerbus layer against channels_redis.

Same app (examples/django_chat under ``uvicorn --workers 4``), same websocket clients, one
run per layer: channels_redis talks to Debian's ``redis-server`` on a Unix socket started
here (no persistence). One client sends group messages; every client (the sender too)
receives each one; all clients live in this process, so one monotonic clock stamps both
ends.

- throughput: the sender keeps at most ``--window`` messages in flight (counted until the
  slowest client has them; below the layers' default channel capacity of 100, so neither
  layer drops), ``--messages`` in all: group messages/s and deliveries/s.
- latency: ``--rate`` group messages/s for ``--seconds``: p50/p99 from send to receipt.

    python -m benchmarks.channels_layer [--clients 20] [--repeat 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import anyio
from websockets.asyncio.client import ClientConnection, unix_connect

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
WORKERS = 4


class Client:
    def __init__(self, ws: ClientConnection, hello: dict[str, Any]) -> None:
        self.ws = ws
        self.worker = hello.get("worker") if hello.get("worker") is not None else hello["pid"]
        self.count = 0
        self.latencies: list[float] = []
        self.progress = anyio.Event()

    async def read(self) -> None:
        async for raw in self.ws:
            now = time.monotonic()
            msg = json.loads(raw)
            self.count += 1
            if msg["body"][1]:
                self.latencies.append(now - msg["body"][0])
            self.progress.set()
            self.progress = anyio.Event()


def start_server(kind: str, app: str, tmp: str) -> tuple[list[subprocess.Popen[bytes]], str]:
    procs: list[subprocess.Popen[bytes]] = []
    env = {**os.environ, "CHANNEL_BACKEND": kind, "PYTHONUNBUFFERED": "1",
           "WORKERBUS_ADDRESS": f"unix:{tmp}/bus.sock", "CHAT_CONSUMER": app}
    if kind == "redis":
        exe = shutil.which("redis-server")
        if exe is None:
            sys.exit("channels_layer: redis-server is not installed (bash scripts/setup.sh)")
        rsock = os.path.join(tmp, "redis.sock")
        procs.append(subprocess.Popen(
            [exe, "--port", "0", "--unixsocket", rsock, "--unixsocketperm", "700", "--save", "",
             "--appendonly", "no", "--dir", tmp, "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, start_new_session=True))
        env["REDIS_URL"] = f"unix://{rsock}"
        for _ in range(200):
            if os.path.exists(rsock):
                break
            time.sleep(0.02)
    uds = os.path.join(tmp, "http.sock")
    log = open(os.path.join(tmp, f"{kind}.log"), "wb")
    procs.append(subprocess.Popen(
        [os.path.join(BIN, "uvicorn"), "examples.django_chat.asgi:application", "--workers",
         str(WORKERS), "--uds", uds, "--lifespan", "off", "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    for _ in range(600):
        if listening(uds):
            break
        time.sleep(0.05)
    else:
        stop(procs)
        sys.exit(f"channels_layer: uvicorn did not start; see {log.name}")
    return procs, uds


def listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in reversed(procs):
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=5)


async def measure(uds: str, args: argparse.Namespace) -> dict[str, Any]:
    clients: list[Client] = []
    async with anyio.create_task_group() as tg:
        for _ in range(args.clients):
            ws = await unix_connect(uds, "ws://localhost/ws/chat/", max_queue=None)
            hello = json.loads(await ws.recv())["hello"]
            clients.append(Client(ws, hello))
            tg.start_soon(clients[-1].read)
        sender = clients[0]

        async def wait_all(n: int, deadline: float = 60.0) -> None:
            with anyio.fail_after(deadline):
                for c in clients:
                    while c.count < n:
                        await c.progress.wait()

        # warm-up: every worker's session is up and every path has been used once
        for i in range(20):
            await sender.ws.send(json.dumps({"op": "group", "body": [time.monotonic(), 0]}))
            await wait_all(i + 1)
        base = 20

        # throughput, windowed
        start = time.monotonic()
        sent = 0
        while sent < args.messages:
            low = min(c.count for c in clients) - base
            while sent < args.messages and sent - low < args.window:
                await sender.ws.send(json.dumps({"op": "group", "body": [time.monotonic(), 0]}))
                sent += 1
            slowest = min(clients, key=lambda c: c.count)
            if slowest.count - base < sent:
                await slowest.progress.wait()
        await wait_all(base + args.messages)
        elapsed = time.monotonic() - start
        base += args.messages

        # latency at fixed rates
        latency: dict[str, dict[str, float]] = {}
        for rate in args.rates:
            for c in clients:
                c.latencies.clear()
            total = int(rate * args.seconds)
            t0 = time.monotonic()
            for i in range(total):
                await anyio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
                await sender.ws.send(json.dumps({"op": "group", "body": [time.monotonic(), 1]}))
            await wait_all(base + total)
            base += total
            lat = sorted(x for c in clients for x in c.latencies)
            latency[f"{rate:g}"] = {"p50_ms": 1000 * lat[len(lat) // 2],
                                    "p99_ms": 1000 * lat[int(len(lat) * 0.99)],
                                    "samples": len(lat)}
        for c in clients:
            await c.ws.close()
        tg.cancel_scope.cancel()
    return {
        "workers_hit": len({c.worker for c in clients}),
        "group_msgs_per_s": args.messages / elapsed,
        "deliveries_per_s": args.messages * len(clients) / elapsed,
        "latency": latency,
        "load": loadavg(),
    }


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--messages", type=int, default=1000)
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--rates", type=float, nargs="+", default=[20.0, 100.0],
                   help="group messages/s for the latency phases")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--layers", nargs="+", default=["workerbus", "redis"])
    p.add_argument("--apps", nargs="+", default=["stock", "nodb"],
                   help="stock: channels' consumer; nodb: skips its per-message DB clean-up")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.window >= 100:
        p.error("--window must stay below the channel capacity (100), or messages are dropped")
    keys = [(app, kind) for app in args.apps for kind in args.layers]
    results: dict[str, list[dict[str, Any]]] = {f"{app}/{kind}": [] for app, kind in keys}
    print(f"channels_layer: {args.clients} clients, uvicorn --workers {WORKERS}, "
          f"{args.messages} group messages (window {args.window}), latency at "
          f"{', '.join(f'{r:g}' for r in args.rates)} msgs/s; "
          f"load average before: {loadavg()}")
    for run in range(args.repeat):
        for app, kind in keys:  # interleaved, so background load hits all alike
            tmp = tempfile.mkdtemp(prefix="wb-chl-")
            procs, uds = start_server(kind, app, tmp)
            try:
                r = anyio.run(measure, uds, args)
            finally:
                stop(procs)
                shutil.rmtree(tmp, ignore_errors=True)
            results[f"{app}/{kind}"].append(r)
            lat = "  ".join(f"@{k}/s p50 {v['p50_ms']:.2f} p99 {v['p99_ms']:.2f} ms"
                            for k, v in r["latency"].items())
            print(f"  run {run + 1} {app + '/' + kind:15s} {r['group_msgs_per_s']:6.0f} group "
                  f"msgs/s {r['deliveries_per_s']:7.0f} deliveries/s  {lat}  "
                  f"({r['workers_hit']} workers hit; load {r['load']})", flush=True)
    print("median of", args.repeat, "runs:")
    summary: dict[str, dict[str, float]] = {}
    for key, rs in results.items():
        m = {k: statistics.median(r[k] for r in rs)
             for k in ("group_msgs_per_s", "deliveries_per_s")}
        for rate in rs[0]["latency"]:
            for q in ("p50_ms", "p99_ms"):
                m[f"{q}@{rate}"] = statistics.median(r["latency"][rate][q] for r in rs)
        summary[key] = m
        lat = "  ".join(f"@{rate}/s p50 {m[f'p50_ms@{rate}']:.2f} p99 {m[f'p99_ms@{rate}']:.2f} ms"
                        for rate in rs[0]["latency"])
        print(f"  {key:15s} {m['group_msgs_per_s']:6.0f} group msgs/s "
              f"{m['deliveries_per_s']:7.0f} deliveries/s  {lat}")
    for app in args.apps:
        w, r = summary.get(f"{app}/workerbus"), summary.get(f"{app}/redis")
        if w is None or r is None:
            continue
        print(f"  {app}: workerbus / channels_redis "
              f"{w['group_msgs_per_s'] / r['group_msgs_per_s']:.2f}x throughput; p99 " + ", ".join(
                  f"@{rate:g}/s {w[f'p99_ms@{rate:g}']:.2f} vs {r[f'p99_ms@{rate:g}']:.2f} ms"
                  for rate in args.rates))
    print(f"load average after: {loadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": results, "median": summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
