"""The web application of the seed experiment: one ASGI app, run by uvicorn workers.

Every request gets a tiny ``200 ok``. Next to serving, every worker posts events in bursts
(``WB_SEED_BURST`` events every ``WB_SEED_EVERY`` seconds) and handles every event any
worker posted, through one of:

- ``workerbus``: a :class:`shared.client.Client` on the broker at ``WB_SEED_ADDRESS``,
  publishing to ``all`` workers (the poster included, like lua-resty-events);
- ``workerbus-embedded``: the same through :func:`shared.embed.join`, so one of the
  workers hosts the broker (``WB_SEED_WORKERS`` workers in all);
- ``shm-poll``: the lua-resty-worker-events design: a ring in a shared-memory file, each
  post appended under an ``flock``, every worker polling the ring every ``WB_SEED_POLL``
  seconds;
- ``none``: no events at all (the baseline).

A handled event only costs counting it and noting how long after its posting it ran. The
worker reports to ``WB_SEED_DIR``: ``ready-<pid>`` once its events run, ``count-<pid>``
(published and received so far, rewritten every 0.25 s) and ``final-<pid>.json`` at
shutdown with the event delays.

Run by ``workerbus bench --seed`` (:mod:`shared.tools.bench.seed`); not a user-facing app.
"""

from __future__ import annotations

import fcntl
import functools
import json
import mmap
import os
import time
from array import array
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import msgpack

from .peers.shmring import ring_append, ring_index, ring_read, ring_size

__all__ = ["app"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_BODY = b"ok"
_HEADERS = [(b"content-type", b"text/plain"), (b"content-length", str(len(_BODY)).encode())]
_SOURCE = "storm"


class _Worker:
    """One uvicorn worker's side of the storm."""

    def __init__(self) -> None:
        env = os.environ
        self.mode = env.get("WB_SEED_MODE", "none")
        self.dir = env.get("WB_SEED_DIR", "")
        self.burst = int(env.get("WB_SEED_BURST", "0"))
        self.every = float(env.get("WB_SEED_EVERY", "1"))
        self.pid = os.getpid()
        self.published = 0
        self.received = 0
        self.delays_us: array[int] = array("q")

    # --- the handler every mode shares ---------------------------------------------------

    def on_event(self, data: Any, event: str, source: str, wid: int | None) -> None:
        self.received += 1
        if event == "tick":
            self.delays_us.append((time.monotonic_ns() - data["ts"]) // 1000)

    # --- reporting -------------------------------------------------------------------------

    def _write(self, name: str, text: str) -> None:
        if not self.dir:
            return
        tmp = os.path.join(self.dir, f".{name}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(self.dir, name))

    async def report_counts(self) -> None:
        while True:
            self._write(f"count-{self.pid}", f"{self.published} {self.received}")
            await anyio.sleep(0.25)

    def report_final(self) -> None:
        self._write(
            f"final-{self.pid}.json",
            json.dumps({"published": self.published, "received": self.received,
                        "delays_us": self.delays_us.tolist()}),  # fmt: skip
        )

    # --- the storm ---------------------------------------------------------------------------

    async def storm(self, post: Callable[[dict[str, int]], Awaitable[None]]) -> None:
        if self.burst <= 0:
            return
        now = time.monotonic_ns
        due = time.monotonic()
        i = 0
        while True:
            due += self.every
            await anyio.sleep(max(0.0, due - time.monotonic()))
            for _ in range(self.burst):
                await post({"i": i, "ts": now()})
                i += 1
            self.published += self.burst

    # --- modes -------------------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.report_counts)
            if self.mode in ("workerbus", "workerbus-embedded"):
                await self._run_bus(tg, task_status)
            elif self.mode == "shm-poll":
                await self._run_shm(tg, task_status)
            else:
                self._write(f"ready-{self.pid}", "")
                task_status.started()

    async def _run_bus(self, tg: anyio.abc.TaskGroup, task_status: anyio.abc.TaskStatus[None]) -> None:
        from shared.client import Client
        from shared.embed import join
        from shared.transportnames import load_transport

        env = os.environ
        address, transport = env["WB_SEED_ADDRESS"], env.get("WB_SEED_TRANSPORT", "stream")
        bus: AbstractAsyncContextManager[Client]
        if self.mode == "workerbus-embedded":
            bus = join(address, workers=int(env.get("WB_SEED_WORKERS", "2")), transport=transport)
        else:
            bus = Client(address, transport=load_transport(transport), worker_id=self.pid)
        async with bus as client:
            client.subscribe(_SOURCE, "*", self.on_event)
            with anyio.fail_after(15):
                await client.wait_ready()
            tg.start_soon(self.storm, functools.partial(client.publish, _SOURCE, "tick"))
            self._write(f"ready-{self.pid}", "")
            task_status.started()
            await anyio.sleep_forever()

    async def _run_shm(self, tg: anyio.abc.TaskGroup, task_status: anyio.abc.TaskStatus[None]) -> None:
        env = os.environ
        fd = os.open(env["WB_SEED_SHM"], os.O_RDWR)
        ring = mmap.mmap(fd, ring_size())
        buf = memoryview(ring)
        interval = float(env.get("WB_SEED_POLL", "0.01"))
        pack = msgpack.Packer().pack
        lock, unlock = fcntl.LOCK_EX, fcntl.LOCK_UN
        flock = fcntl.flock

        async def post(data: dict[str, int]) -> None:
            payload = pack({"source": _SOURCE, "event": "tick", "data": data})
            flock(fd, lock)
            try:
                ring_append(buf, payload)
            finally:
                flock(fd, unlock)

        async def poll() -> None:
            flock(fd, lock)
            last = ring_index(buf)
            flock(fd, unlock)
            unpack = msgpack.unpackb
            on_event = self.on_event
            while True:
                await anyio.sleep(interval)
                flock(fd, lock)
                index = ring_index(buf)
                flock(fd, unlock)
                for payload in ring_read(buf, last, index):
                    msg = unpack(payload)
                    on_event(msg["data"], msg["event"], msg["source"], None)
                last = index

        try:
            tg.start_soon(poll)
            tg.start_soon(self.storm, post)
            self._write(f"ready-{self.pid}", "")
            task_status.started()
            await anyio.sleep_forever()
        finally:
            buf.release()
            ring.close()
            os.close(fd)


async def _lifespan(receive: Receive, send: Send) -> None:
    await receive()  # lifespan.startup
    worker = _Worker()
    started = False
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            started = True
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            tg.cancel_scope.cancel()
    except Exception as exc:  # noqa: BLE001 - report any failure to uvicorn
        phase = "shutdown" if started else "startup"
        await send({"type": f"lifespan.{phase}.failed", "message": repr(exc)})
        return
    worker.report_final()
    await send({"type": "lifespan.shutdown.complete"})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
        await send({"type": "http.response.body", "body": _BODY})
    elif scope["type"] == "lifespan":
        await _lifespan(receive, send)
