"""A worker process for the cluster tests: a real Client driven by JSON lines on stdin.

stdout gets one JSON line per event received ({"source", "event", "data", "wid", "node"})
and ``{"ready": true}`` once connected. Commands on stdin:
``{"op": "publish", "n": N, "scope": ..., "target": ..., "event": NAME, "pad": BYTES}``
publishes N events numbered 0..N-1, each padded with BYTES characters (then prints ``{"published": N, "event": NAME}``), ``{"op": "exit"}`` ends.

``node`` is what a handler sees as ``wid.node`` (events from other nodes).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio

import streambus
from shared.client import Client


def record(data: Any, event: str, source: str, wid: int | None) -> None:
    # What a handler can tell: which node an event came from is wid.node (None: this host).
    line = {"source": source, "event": event, "data": data, "wid": wid, "node": getattr(wid, "node", None)}
    print(json.dumps(line), flush=True)


async def main(address: str, worker_id: int) -> None:
    async with Client(address, transport=streambus.TRANSPORT, worker_id=worker_id) as bus:
        bus.subscribe("*", "*", record)
        await bus.wait_ready()
        print(json.dumps({"ready": True}), flush=True)
        while True:
            line = await anyio.to_thread.run_sync(sys.stdin.readline)
            if not line:
                return
            cmd: dict[str, Any] = json.loads(line)
            if cmd["op"] == "exit":
                await bus.flush()
                return
            pad = "x" * cmd.get("pad", 0)
            for i in range(cmd["n"]):
                data: dict[str, Any] = {"i": i, "from": worker_id}
                if pad:
                    data["pad"] = pad
                await bus.publish(
                    "test", cmd["event"], data,
                    cmd.get("target", "all"), scope=cmd.get("scope", "local"),
                )
            await bus.flush()
            print(json.dumps({"published": cmd["n"], "event": cmd["event"]}), flush=True)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], int(sys.argv[2]))
