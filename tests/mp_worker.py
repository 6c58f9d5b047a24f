"""A worker process driven over stdin/stdout by tests/test_multiprocess.py.

Reads JSON commands, one per line, and prints JSON lines: every event received
(``{"ev": [source, event, data, wid]}``), ``{"ready": true}`` once connected, and answers to
``{"cmd": "stats"}``. Exits on ``{"cmd": "quit"}`` or EOF.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio
import anyio.to_thread

from shared.client import Client
from shared.transportnames import load_transport


def emit(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main(address: str, transport: str, worker_id: int) -> None:
    async with Client(address, transport=load_transport(transport), worker_id=worker_id) as bus:

        def record(data: Any, event: str, source: str, wid: int | None) -> None:
            emit({"ev": [source, event, data, wid]})

        bus.subscribe("*", "*", record)
        await bus.wait_ready()
        emit({"ready": True})
        while True:
            line = await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
            if not line:
                return
            cmd = json.loads(line)
            if cmd["cmd"] == "publish":
                await bus.publish(cmd["source"], cmd["event"], cmd.get("data"), cmd.get("target", "all"))
            elif cmd["cmd"] == "flush":
                await bus.flush()
                emit({"flushed": True})
            elif cmd["cmd"] == "stats":
                s = bus.statistics()
                emit({"stats": {"connected": s.connected, "reconnects": s.reconnects, "buffered": s.buffered}})
            elif cmd["cmd"] == "quit":
                await bus.flush()
                return


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]), backend=sys.argv[4] if len(sys.argv) > 4 else "asyncio")
