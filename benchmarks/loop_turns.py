"""Loop turns per hop: an in-memory pipe (shared/inproc.py) against a Unix socket.

    python -m benchmarks.loop_turns

A task that yields in a loop counts the event loop's turns; another task waits to read,
and the count is taken between a write and the moment the reader runs. Printed per event
loop (asyncio, uvloop, trio): the median and the largest number of turns a hop took over
100 hops. A hop that takes one turn more costs a saturated server one more round of its
ready callbacks.
"""

from __future__ import annotations

import os
import tempfile

import anyio
import anyio.lowlevel
from anyio.abc import ByteStream

from shared.inproc import pipe
from shared.sockets import connect_unix, guard

HOPS = 100


class _Turns:
    def __init__(self) -> None:
        self.count = 0

    async def spin(self) -> None:
        while True:
            self.count += 1
            await anyio.lowlevel.checkpoint()


async def _hops(writer: ByteStream, reader: ByteStream) -> tuple[int, int]:
    turns = _Turns()
    taken: list[int] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(turns.spin)
        for _ in range(HOPS):
            woke: list[int] = []

            async def read(woke: list[int] = woke) -> None:
                await reader.receive()
                woke.append(turns.count)

            async with anyio.create_task_group() as hop:
                hop.start_soon(read)
                await anyio.sleep(0.0005)  # (the reader waits by now)
                before = turns.count
                await writer.send(b"x")
            taken.append(woke[0] - before)
        tg.cancel_scope.cancel()
    taken.sort()
    return taken[len(taken) // 2], taken[-1]


async def measure() -> dict[str, tuple[int, int]]:
    mine, theirs = pipe()
    out = {"pipe": await _hops(mine, theirs)}
    path = os.path.join(tempfile.mkdtemp(prefix="wb-turns-"), "s.sock")
    accepted: list[ByteStream] = []
    async with await anyio.create_unix_listener(path) as listener:
        async with anyio.create_task_group() as tg:

            async def accept() -> None:
                accepted.append(guard(await listener.accept()))

            tg.start_soon(accept)
            client = await connect_unix(path)
        out["unix socket"] = await _hops(client, accepted[0])
        await client.aclose()
        await accepted[0].aclose()
    os.unlink(path)
    return out


def main() -> None:
    for name, backend, options in (
        ("asyncio", "asyncio", {}),
        ("uvloop", "asyncio", {"use_uvloop": True}),
        ("trio", "trio", {}),
    ):
        got = anyio.run(measure, backend=backend, backend_options=options)
        print(f"{name:8s} " + "   ".join(f"{k}: {m} turn(s) median, {x} max" for k, (m, x) in got.items()))


if __name__ == "__main__":
    main()
