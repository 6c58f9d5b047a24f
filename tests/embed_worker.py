"""An embedded worker process (``join()``) driven over stdin/stdout by
tests/test_embed_processes.py.

    python -m tests.embed_worker ADDRESS WORKERS TRANSPORT BACKEND

Prints JSON lines: ``{"welcome": ...}`` for every broker welcome (generation, whether this
process hosts, its worker id and pid), ``{"ev": [source, event, data, wid]}`` for every
other event, and answers ``{"cmd": "publish", ...}`` with nothing, ``{"cmd": "stats"}``
with ``{"stats": ...}``. Leaves the bus politely on ``{"cmd": "quit"}`` or EOF.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import anyio
import anyio.to_thread

from shared.embed import join


def emit(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main(address: str, workers: int, transport: str) -> None:
    async with join(address, workers=workers, transport=transport) as bus:

        def record(data: Any, event: str, source: str, wid: int | None) -> None:
            if source == "workerbus" and event == "welcome":
                emit(
                    {
                        "welcome": data["broker"]["generation"],
                        "host": data["broker"]["pid"] == os.getpid(),
                        "wid": bus.worker_id,
                        "pid": os.getpid(),
                    }
                )
            else:
                emit({"ev": [source, event, data, wid]})

        bus.subscribe("*", "*", record)
        while True:
            line = await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
            if not line:
                return
            cmd = json.loads(line)
            if cmd["cmd"] == "publish":
                bus.publish_nowait(cmd["source"], cmd["event"], cmd.get("data"), cmd.get("target", "all"))
            elif cmd["cmd"] == "stats":
                emit({"stats": {"lost": bus.lost, "moves": bus.broker_moves, "ready": bus.is_ready}})
            elif cmd["cmd"] == "quit":
                await bus.flush()
                return


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    anyio.run(main, sys.argv[1], int(sys.argv[2]), sys.argv[3], backend=sys.argv[4])
