"""The in-process LocalBus: the client's API and refusals, with no socket."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import pytest

from shared.errors import LocalProtocolError, PayloadTooLarge
from shared.testing import LocalBus

from .helpers import Recorder

pytestmark = pytest.mark.anyio


async def test_routing_mirrors_a_one_worker_broker() -> None:
    async with LocalBus(worker_id=3, unique_timeout=60) as bus:
        rec = Recorder()
        bus.subscribe("*", "*", rec)
        await bus.publish("s", "all", {"k": (1, 2)})
        await bus.publish("s", "mine", target=3)
        await bus.publish("s", "not-mine", target=4)
        await bus.publish("s", "others", target="others")
        await bus.publish("s", "u1", target="unique:k")
        await bus.publish("s", "u2", target="unique:k")
        bus.publish_nowait("s", "local", object(), target="current")
        await bus.drain()
        names = rec.names()
        assert names == ["all", "mine", "u1", "local"]
        assert rec.events[0][2] == {"k": [1, 2]}  # data went through the codec, like on the wire
        assert rec.events[0][3] == 3
        assert bus.statistics()["unique_duplicates"] == 1


async def test_refuses_what_the_real_client_refuses() -> None:
    async with LocalBus(max_payload_len=100) as bus:
        with pytest.raises(PayloadTooLarge):
            await bus.publish("s", "e", "x" * 100)
        with pytest.raises(LocalProtocolError):
            await bus.publish("s", "e", {1, 2})
        with pytest.raises(ValueError):
            await bus.publish("s", "")


async def test_handlers_async_iterator_and_errors() -> None:
    async with LocalBus() as bus:
        seen: list[Any] = []

        async def handler(data: Any, event: str, source: str, wid: int | None) -> None:
            await anyio.lowlevel.checkpoint()
            seen.append(data)
            if data == 2:
                raise RuntimeError("boom")

        bus.subscribe("s", "e", handler)
        async with bus.events("s", "e") as events:
            for i in range(3):
                await bus.publish("s", "e", i)
            got = [(await events.receive()).data for _ in range(3)]
        await bus.drain()
        assert got == seen == [0, 1, 2]
        assert bus.statistics()["handler_errors"] == 1
