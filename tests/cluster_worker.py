"""A worker process for the cluster tests: a real Client driven by JSON lines on stdin.

stdout gets one JSON line per event received ({"source", "event", "data", "wid", "node"})
and ``{"ready": true}`` once connected. Commands on stdin:
``{"op": "publish", "n": N, "scope": ..., "target": ..., "event": NAME}`` publishes N events
numbered 0..N-1 (then prints ``{"published": N, "event": NAME}``), ``{"op": "exit"}`` ends.

``node`` comes from the raw event map (the bridge adds it to events from other nodes),
read by decoding each delivery's bytes here.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio
import msgpack

from shared.client import Client
from shared.dispatch import Fields
from shared.errors import RemoteProtocolError


class RecordingClient(Client):
    def _decode_batch(self, payloads: list[bytes]) -> tuple[list[Fields], list[RemoteProtocolError]]:
        for payload in payloads:
            msg = msgpack.unpackb(payload, raw=False)
            line = {k: msg.get(k) for k in ("source", "event", "data", "wid", "node")}
            sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()
        return super()._decode_batch(payloads)


async def main(address: str, worker_id: int) -> None:
    async with RecordingClient(address, transport="stream", worker_id=worker_id) as bus:
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
            for i in range(cmd["n"]):
                await bus.publish(
                    "test", cmd["event"], {"i": i, "from": worker_id},
                    cmd.get("target", "all"), scope=cmd.get("scope", "local"),
                )
            await bus.flush()
            print(json.dumps({"published": cmd["n"], "event": cmd["event"]}), flush=True)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], int(sys.argv[2]))
