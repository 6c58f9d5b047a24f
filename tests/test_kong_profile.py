"""The kong profile end to end: 3-byte frames and LuaJIT string.buffer payloads through our
broker and client, and interop with bytes produced by LuaJIT and by real lua-resty-events.

The LuaJIT cases need Debian's ``luajit`` (scripts/setup.sh installs it; in CI its absence is
a failure). The capture cases read ``../shared/vectors/kong`` and are skipped where that folder
does not exist (it ships beside the checkout only on the team's machines and in CI).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

import anyio
import pytest

from httpbus.handshake import REQUEST
from shared.broker import Broker
from shared.client import Client
from shared.errors import PayloadTooLarge
from shared.frame import FrameDecoder, encode_frame
from shared.luabuf import dumps, loads
from shared.profile import get_profile
from shared.transport import get_transport, parse_address

from .helpers import Recorder, kong_captures, wait_until

KONG = get_profile("kong")
CAPTURES = kong_captures()


@pytest.fixture
async def kong_broker(address: str, transport: str) -> Any:
    b = Broker(transport=transport, profile="kong", expected_workers=2, unique_timeout=0.3)
    async with anyio.create_task_group() as tg:
        await tg.start(b.serve, address)
        yield b
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_bus_in_the_kong_profile(kong_broker: Broker, address: str, transport: str) -> None:
    async with (
        Client(address, transport=transport, profile="kong", worker_id=0) as c0,
        Client(address, transport=transport, profile="kong", worker_id=-1) as agent,
    ):
        recs = [Recorder(), Recorder()]
        c0.subscribe("*", "*", recs[0])
        agent.subscribe("*", "*", recs[1])
        with anyio.fail_after(5):
            await c0.wait_ready()
            await agent.wait_ready()
        await wait_until(lambda: kong_broker.statistics().connections == 2)
        data = {"list": [1, 2.5, "x"], "nested": {"ok": True}, "blob": b"\xff\x00"}
        await agent.publish("src", "evt", data)
        for rec in recs:
            ((source, event, got, wid),) = await rec.wait_for(1)
            assert (source, event, wid) == ("src", "evt", -1)
            assert got == {"list": [1, 2.5, "x"], "nested": {"ok": True}, "blob": b"\xff\x00"}
        with pytest.raises(ValueError, match="kong"):
            await c0.publish("src", "evt", target="others")
        with pytest.raises(ValueError, match="kong"):
            await c0.publish("src", "evt", target=1)
        # lua-resty-events' default max_payload_len is 64 KiB, enforced on the encoded outer.
        assert c0.max_payload_len == 65536
        with pytest.raises(PayloadTooLarge):
            await c0.publish("src", "big", "y" * 65536)


@pytest.mark.anyio
async def test_kong_frames_carry_more_than_64k(address: str, transport: str) -> None:
    b = Broker(transport=transport, profile="kong", expected_workers=1)
    async with anyio.create_task_group() as tg:
        await tg.start(b.serve, address)
        async with Client(address, transport=transport, profile="kong", worker_id=0, max_payload_len=2**21) as c:
            rec = Recorder()
            c.subscribe("*", "*", rec)
            await c.publish("s", "big", "z" * 1_000_000)
            ((_, _, got, _),) = await rec.wait_for(1)
            assert got == "z" * 1_000_000
        tg.cancel_scope.cancel()


def _lua(script: str) -> bytes:
    luajit = shutil.which("luajit")
    if luajit is None:
        if os.environ.get("CI"):
            pytest.fail("luajit is missing: scripts/setup.sh installs it (Debian package luajit2)")
        pytest.skip("luajit is not installed (scripts/setup.sh installs it)")
    out = subprocess.run([luajit, "-e", script], capture_output=True, timeout=30, check=True)
    return bytes.fromhex(out.stdout.decode().strip())


LUA_PUBLISH = r"""
local buffer = require "string.buffer"
local enc = buffer.new({dict = {"spec","data","source","event","wid","unique"}})
local inner = enc:reset():encode({source="src", event="evt", wid=0, data={a=1, b="x", list={10, 20}}}):get()
local outer = enc:reset():encode({spec={%s}, data=inner}):get()
io.write((outer:gsub(".", function(c) return string.format("%%02x", c:byte()) end)))
"""


@pytest.mark.anyio
@pytest.mark.luajit
@pytest.mark.parametrize("spec", ["", 'unique="u-1"'])
async def test_our_broker_forwards_luajit_publishes_unchanged(address: str, transport: str, spec: str) -> None:
    outer = _lua(LUA_PUBLISH % spec)
    inner = loads(outer)["data"]  # type: ignore[index]
    inner_bytes = inner.encode() if isinstance(inner, str) else inner
    b = Broker(transport=transport, profile="kong", expected_workers=1)
    async with anyio.create_task_group() as tg:
        await tg.start(b.serve, address)
        stream, initial = await get_transport(transport).connect(parse_address(address))
        async with stream:
            hello = dumps({"id": 0, "pid": 4321})
            await stream.send(encode_frame(hello, 3) + encode_frame(outer, 3))
            decoder = FrameDecoder(3)
            frames = decoder.feed(initial)
            with anyio.fail_after(5):
                while not frames:
                    frames += decoder.feed(await stream.receive())
        tg.cancel_scope.cancel()
        assert frames[0] == inner_bytes
        assert loads(frames[0]) == {"source": "src", "event": "evt", "wid": 0, "data": {"a": 1, "b": "x", "list": [10, 20]}}


def _hex(name: str) -> bytes:
    lines = (CAPTURES / name).read_text().splitlines()
    return bytes.fromhex("".join(line for line in lines if line and not line.startswith("#")))


needs_captures = pytest.mark.skipif(not CAPTURES.is_dir(), reason="no ../shared/vectors/kong here")


@needs_captures
def test_our_upgrade_request_is_what_a_real_worker_sends() -> None:
    assert _hex("worker-upgrade-request.hex") == REQUEST


@needs_captures
def test_our_hello_decodes_like_a_real_workers() -> None:
    real = FrameDecoder(3).feed(_hex("worker-info-frame.hex"))[0]
    theirs, ours = loads(real), loads(dumps({"id": 0, "pid": 1}))
    assert isinstance(theirs, dict) and isinstance(ours, dict)
    assert set(theirs) == set(ours) == {"id", "pid"}
    assert isinstance(theirs["id"], int) and isinstance(theirs["pid"], int)


@needs_captures
@pytest.mark.anyio
@pytest.mark.parametrize(
    "capture", ["worker-publish-frame-case01-all.hex", "worker-publish-frame-case02-all.hex",
                "worker-publish-frame-case11-all.hex", "worker-publish-frame-case11-uniq-hash.hex"],
)
async def test_real_worker_publishes_through_our_broker(address: str, transport: str, capture: str) -> None:
    publish_frame = _hex(capture)
    (outer,) = FrameDecoder(3).feed(publish_frame)
    inner = loads(outer)["data"]  # type: ignore[index]
    inner_bytes = inner.encode() if isinstance(inner, str) else inner
    b = Broker(transport=transport, profile="kong", expected_workers=1)
    async with anyio.create_task_group() as tg:
        await tg.start(b.serve, address)
        stream, initial = await get_transport(transport).connect(parse_address(address))
        async with stream:
            hello = FrameDecoder(3).feed(_hex("worker-info-frame.hex"))[0]
            await stream.send(encode_frame(hello, 3) + publish_frame)
            decoder = FrameDecoder(3)
            frames = decoder.feed(initial)
            with anyio.fail_after(5):
                while not frames:
                    frames += decoder.feed(await stream.receive())
        tg.cancel_scope.cancel()
        # What a real broker delivers: the inner bytes, byte for byte.
        assert frames[0] == inner_bytes
