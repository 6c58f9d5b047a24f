"""The hot-path shortcuts behave exactly like the general code they stand in for.

Each speed-up of issue 6 keeps a general path and adds a shortcut for the common case; these
tests hold the shortcut to the general path's results, on many generated inputs:

- encode_publish / decode_publish / decode_publish_batch: native publishes to all/others
  built and recognised by their bytes;
- build_publish_frame: one function per publish;
- decode_event_batch: a read's deliveries decoded in one loop;
- MsgpackCodec.dumps: pooled packers;
- WorkerQueue.push_many, Router.route_many, WorkerQueue.take_batch: whole runs per queue;
- Dispatcher.run: handler lists remembered per (source, event), no coroutine per event;
- Dispatcher.push_many + wait_room: the bounded hand-over delivers what an unbounded inbox does.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from typing import Any

import anyio
import anyio.lowlevel
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.codec import MsgpackCodec
from shared.dispatch import Dispatcher
from shared.errors import LocalProtocolError, PayloadTooLarge, RemoteProtocolError
from shared.frame import frame_header
from shared.messages import (
    ALL,
    OTHERS,
    Event,
    build_publish,
    build_publish_frame,
    decode_event_batch,
    decode_event_fields,
    decode_publish,
    decode_publish_batch,
    encode_event,
    encode_publish,
    parse_target,
)
from shared.profile import NATIVE, get_profile
from shared.router import OverflowPolicy, Router, WorkerQueue

SIZES = [0, 1, 13, 200, 255, 256, 257, 1000, 65535, 65536, 70000]


# --- publish messages --------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("target", [ALL, OTHERS], ids=["all", "others"])
def test_encode_publish_is_what_msgpack_makes(size: int, target: Any) -> None:
    inner = random.Random(size).randbytes(size)
    spec = {} if target is ALL else {"others": True}
    assert encode_publish(NATIVE, target, inner) == msgpack.packb({"spec": spec, "data": inner}, use_bin_type=True)


def _slow_decode_publish(payload: bytes) -> Any:
    # decode_publish's general path: a bytearray is not taken by the byte-level shortcut.
    try:
        return decode_publish(NATIVE, bytearray(payload))  # type: ignore[arg-type]
    except RemoteProtocolError as exc:
        return ("error", str(exc))


def _fast_decode_publish(payload: bytes) -> Any:
    try:
        return decode_publish(NATIVE, payload)
    except RemoteProtocolError as exc:
        return ("error", str(exc))


@pytest.mark.parametrize("size", [s for s in SIZES if s < 65000])
@pytest.mark.parametrize("target", [ALL, OTHERS], ids=["all", "others"])
def test_decode_publish_shortcut_agrees(size: int, target: Any) -> None:
    inner = random.Random(size).randbytes(size)
    good = encode_publish(NATIVE, target, inner)
    assert decode_publish(NATIVE, good) == (target, inner)
    variants = [good, good + b"x", good[:-1], good[:13], good[:12], good[:1]]
    if size:
        variants.append(good[:12] + bytes([0xC4, (good[13] + 1) % 256]) + good[14:])
    for payload in variants:
        assert _fast_decode_publish(payload) == _slow_decode_publish(payload)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40))
def test_decode_publish_shortcut_agrees_on_noise_after_the_head(tail: bytes) -> None:
    for head in (b"\x82\xa4spec\x80\xa4data", b"\x82\xa4spec\x81\xa6others\xc3\xa4data"):
        payload = head + tail
        assert _fast_decode_publish(payload) == _slow_decode_publish(payload)


def _publishes(rng: random.Random, count: int) -> list[bytes]:
    targets = [ALL, OTHERS, parse_target("worker:3"), parse_target("unique:k")]
    out = []
    for i in range(count):
        inner = encode_event(NATIVE, "s", "e", {"i": i, "pad": "x" * rng.choice([0, 10, 300])}, 1)
        out.append(encode_publish(NATIVE, rng.choice(targets), inner))
    return out


@pytest.mark.parametrize("seed", range(20))
def test_decode_publish_batch_is_decode_publish_in_runs(seed: int) -> None:
    rng = random.Random(seed)
    payloads = _publishes(rng, rng.randint(0, 40))
    bad_at = rng.choice([None, *range(len(payloads))]) if payloads else None
    if bad_at is not None:
        payloads[bad_at] = b"\xc1"  # never valid MessagePack
    runs, error = decode_publish_batch(NATIVE, payloads)
    good = payloads if bad_at is None else payloads[:bad_at]
    flat = [(t, frame) for t, run in runs for frame in run]
    expected = []
    for p in good:
        target, data = decode_publish(NATIVE, p)
        expected.append((target, frame_header(len(data), 2) + data))
    assert flat == expected
    assert all(runs[i][0] is not runs[i + 1][0] or runs[i][0] not in (ALL, OTHERS) for i in range(len(runs) - 1))
    assert (error is None) == (bad_at is None)
    if error is not None:
        assert isinstance(error, RemoteProtocolError)


# --- building a publish -----------------------------------------------------------------


@pytest.mark.parametrize("target", ["all", "others", "worker:2", "unique:k"])
@pytest.mark.parametrize("data", [None, 0, "s", {"x": [1, 2.5, None]}, b"z" * 300, "y" * 70000])
def test_build_publish_frame_is_build_publish_framed(target: str, data: Any) -> None:
    parsed = parse_target(target)

    def both(limit: int) -> tuple[Any, Any]:
        try:
            fast: Any = build_publish_frame(NATIVE, 3, "src", "ev", data, parsed, limit)
        except PayloadTooLarge as exc:
            fast = ("too large", exc.args)
        try:
            _, outer = build_publish(NATIVE, 3, "src", "ev", data, parsed, limit)
            slow: Any = frame_header(len(outer), 2) + outer
        except PayloadTooLarge as exc:
            slow = ("too large", exc.args)
        return fast, slow

    for limit in (65535, 60):
        fast, slow = both(limit)
        assert fast == slow


def test_build_publish_frame_refuses_what_build_publish_refuses() -> None:
    for source, event in (("", "e"), ("s", ""), (1, "e")):
        with pytest.raises(ValueError, match="non-empty strings"):
            build_publish_frame(NATIVE, 1, source, event, None, ALL, 65535)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        build_publish_frame(NATIVE, 1, "s", "e", object(), ALL, 65535)


# --- decoding deliveries ----------------------------------------------------------------


def _fields_or_error(payload: bytes) -> Any:
    try:
        return decode_event_fields(NATIVE, payload)
    except RemoteProtocolError:
        return "error"


def test_decode_event_batch_is_decode_event_fields_per_payload() -> None:
    pack = MsgpackCodec().dumps
    payloads = [
        encode_event(NATIVE, "s", "e", {"a": 1}, 4),
        encode_event(NATIVE, "s", "e", None, None),
        pack({"source": "s", "event": "e", "wid": 2.0}),  # a Lua number: accepted as 2
        pack({"source": "s", "event": "e", "wid": True}),
        pack({"source": "s"}),
        pack({"event": "e"}),
        pack([1, 2]),
        pack({"source": 1, "event": "e"}),
        b"\xc1",
        b"",
        encode_event(NATIVE, "workerbus", "dropped", {"count": 3}, None),
    ]
    events, errors = decode_event_batch(NATIVE, payloads)
    expected = [_fields_or_error(p) for p in payloads]
    assert events == [e for e in expected if e != "error"]
    assert len(errors) == expected.count("error")
    assert all(isinstance(e, RemoteProtocolError) for e in errors)


def test_decode_event_batch_in_the_kong_profile() -> None:
    kong = get_profile("kong")
    payloads = [encode_event(kong, "s", "e", {"k": "v"}, 1), encode_event(kong, "s", "f", None, None)]
    events, errors = decode_event_batch(kong, payloads)
    assert errors == []
    assert events == [decode_event_fields(kong, p) for p in payloads]


# --- the codec's packer pool ------------------------------------------------------------


class _Sneaky(dict[str, Any]):
    """A dict whose items() packs something else first: a re-entrant dumps."""

    def __init__(self, codec: MsgpackCodec, *args: Any) -> None:
        super().__init__(*args)
        self.codec = codec
        self.inner: bytes = b""

    def items(self) -> Any:
        self.inner = self.codec.dumps({"inner": [1, 2, 3]})
        return super().items()


def test_pooled_packer_recovers_from_errors_and_reentry() -> None:
    codec = MsgpackCodec()
    value = {"source": "s", "event": "e", "data": [1, {"x": b"y"}], "wid": 3}
    assert codec.dumps(value) == msgpack.packb(value, use_bin_type=True)
    with pytest.raises(LocalProtocolError):
        codec.dumps({"a": [1, object()]})
    assert codec.dumps(value) == msgpack.packb(value, use_bin_type=True)
    sneaky = _Sneaky(codec, {"k": "v"})
    out = codec.dumps({"outer": sneaky})
    assert msgpack.unpackb(out) == {"outer": {"k": "v"}}
    assert msgpack.unpackb(sneaky.inner) == {"inner": [1, 2, 3]}
    assert codec.dumps(value) == msgpack.packb(value, use_bin_type=True)


# --- queues and routing -----------------------------------------------------------------


def _reference_take(frames: deque[bytes], max_bytes: int) -> list[bytes]:
    batch: list[bytes] = []
    size = 0
    while frames and (not batch or size + len(frames[0]) <= max_bytes):
        frame = frames.popleft()
        size += len(frame)
        batch.append(frame)
    return batch


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=3000), max_size=400),
    max_bytes=st.integers(min_value=1, max_value=20000),
)
def test_take_batch_takes_what_fits_like_the_plain_loop(sizes: list[int], max_bytes: int) -> None:
    frames = [bytes([i % 256]) * n for i, n in enumerate(sizes)]
    queue = WorkerQueue(0, 10**9, expected=False, now=0.0)
    queue.frames.extend(frames)
    reference = deque(frames)
    while queue.frames or reference:
        batch = queue.take_batch(max_bytes)
        assert batch == _reference_take(reference, max_bytes)
        assert queue.in_flight == len(batch)
        queue.mark_sent(len(batch))


def _state(router: Router) -> Any:
    stats = router.statistics()
    return stats, {wid: list(q.frames) for wid, q in router.queues.items()}


@pytest.mark.parametrize("policy", list(OverflowPolicy))
@pytest.mark.parametrize("seed", range(12))
def test_route_many_is_route_frame_by_frame(policy: OverflowPolicy, seed: int) -> None:
    rng = random.Random(seed)
    max_len = rng.choice([1, 3, 10, 1000])
    one, many = (
        Router(max_queue_len=max_len, expected_workers=4, overflow=policy, rng=random.Random(seed))
        for _ in range(2)
    )
    taps: list[list[Any]] = [[], []]
    for r, log in ((one, taps[0]), (many, taps[1])):
        for wid in range(4):
            r.attach(wid)
        r.taps.append(lambda *a, log=log: log.append(a))
    for step in range(30):
        target = rng.choice([ALL, OTHERS, parse_target("worker:1"), parse_target(f"unique:{step % 3}")])
        publisher = rng.choice([0, 1, None])
        frames = [f"{step}.{i}".encode() for i in range(rng.randint(1, 8))]
        landed_one = sum(one.route(publisher, target, f) for f in frames)
        landed_many = many.route_many(publisher, target, frames)
        assert landed_one == landed_many
        if rng.random() < 0.3:  # a writer drains one queue, the same way in both
            wid, max_bytes = rng.choice([0, 1, 2, 3]), rng.choice([5, 50, 1000])
            for r in (one, many):
                q = r.queues[wid]
                q.mark_sent(len(q.take_batch(max_bytes)))
        assert _state(one) == _state(many), step
    assert taps[0] == taps[1]


@settings(max_examples=300, deadline=None)
@given(
    policy=st.sampled_from(list(OverflowPolicy)),
    max_len=st.integers(1, 8),
    before=st.integers(0, 12),
    run=st.integers(1, 20),
)
def test_push_many_over_a_full_queue_is_push_frame_by_frame(
    policy: OverflowPolicy, max_len: int, before: int, run: int
) -> None:
    # ``before`` may exceed max_len: a failed write's put_back can overfill a queue.
    frames = [b"%d" % i for i in range(run)]
    one, many = (WorkerQueue(0, max_len, expected=False, now=0.0) for _ in range(2))
    wakes = [0, 0]
    for i, q in enumerate((one, many)):
        q.frames.extend(b"old%d" % j for j in range(before))
        q.wakeup = lambda i=i: wakes.__setitem__(i, wakes[i] + 1)
    landed = sum(one.push(f, policy) for f in frames)
    assert many.push_many(frames, policy) == landed
    assert list(many.frames) == list(one.frames)
    assert (many.routed, many.enqueued, many.dropped, many.dropped_unreported) == (
        one.routed, one.enqueued, one.dropped, one.dropped_unreported,
    )
    assert wakes[0] == wakes[1]


# --- the dispatcher ---------------------------------------------------------------------


def _dispatch_scenario(seed: int, use_run: bool) -> Any:
    rng = random.Random(seed)
    d = Dispatcher(1000)
    calls: list[tuple[str, str]] = []
    keys = [("*", "*"), ("s", "*"), ("s", "e"), ("s", "f")]
    ids: dict[str, str] = {}
    made = [0]

    def make(name: str) -> Any:
        action = rng.choice(["none", "none", "subscribe", "unsubscribe", "raise", "async"])
        target = rng.choice(keys)
        pick = rng.random()

        def handler(data: Any, event: str, source: str, wid: int | None) -> Any:
            calls.append((name, event))
            if action == "subscribe" and made[0] < 30:
                made[0] += 1
                ids[f"{name}+{made[0]}"] = d.subscribe(*target, make(f"{name}+{made[0]}"))
            elif action == "unsubscribe" and ids:
                d.unsubscribe(ids.pop(sorted(ids)[int(pick * len(ids))]))
            elif action == "raise":
                raise RuntimeError("handler failure (expected by the test)")
            elif action == "async":

                async def later() -> None:
                    calls.append((name, "awaited"))

                return later()
            return None

        return handler

    for i in range(rng.randint(1, 6)):
        ids[f"h{i}"] = d.subscribe(*rng.choice(keys), make(f"h{i}"))
    events = [Event("s", rng.choice(["e", "f", "g"]), None, 1) for _ in range(5)]

    async def main() -> None:
        if not use_run:
            for ev in events:
                await d.dispatch(ev)
            return
        for ev in events:
            d.push(ev)
        async with anyio.create_task_group() as tg:
            tg.start_soon(d.run)
            with anyio.fail_after(5):
                while d.depth or d.busy:
                    await anyio.lowlevel.checkpoint()
            tg.cancel_scope.cancel()

    anyio.run(main)
    return calls, d.handler_errors, d.delivered


def test_run_calls_handlers_exactly_like_dispatch(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, logger="shared.dispatch")
    for seed in range(400):
        assert _dispatch_scenario(seed, use_run=True) == _dispatch_scenario(seed, use_run=False), seed


@pytest.mark.anyio
async def test_push_many_takes_what_fits_and_drops_nothing() -> None:
    d = Dispatcher(3)
    seen: list[str] = []
    d.subscribe("*", "*", lambda data, event, source, wid: seen.append(event))
    events = [("s", str(i), None, 1) for i in range(5)]
    assert d.push_many(events) == 3
    assert (d.dropped, d.depth, d.full) == (0, 3, True)
    async with anyio.create_task_group() as tg:
        tg.start_soon(d.run)
        with anyio.fail_after(5):
            await d.wait_room()  # woken after the handlers' burst
            assert d.push_many(events[3:]) == 2
            while d.depth or d.busy:
                await anyio.lowlevel.checkpoint()
        tg.cancel_scope.cancel()
    assert seen == ["0", "1", "2", "3", "4"]
    assert (d.delivered, d.dropped) == (5, 0)


async def _hand_over_scenario(seed: int, bounded: bool) -> tuple[list[Any], int]:
    """A reader pushing reads of random size into a dispatcher whose handlers are a mix
    of synchronous, asynchronous and an iterator with a small buffer. ``bounded``: the
    client's hand-over (push_many, then wait_room for the rest); else an unbounded inbox.
    Returns what the handlers and the iterator saw, in order, and the deepest inbox."""
    rng = random.Random(seed)
    limit = rng.choice([1, 2, 7, 50])
    d = Dispatcher(limit if bounded else 10**9)
    seen: list[Any] = []
    deepest = 0

    async def slow(data: Any, event: str, source: str, wid: int | None) -> None:
        for _ in range(data % 3):
            await anyio.lowlevel.checkpoint()
        seen.append(("slow", data))

    d.subscribe("s", "*", lambda data, event, source, wid: seen.append(("sync", data)))
    d.subscribe("s", "e", slow)
    n = 0
    reads = []
    for _ in range(rng.randint(1, 12)):
        size = rng.randint(1, 30)
        reads.append([("s", "e", n + i, 1) for i in range(size)])
        n += size
    async with anyio.create_task_group() as tg:
        tg.start_soon(d.run)
        async with d.events("s", "e", max_buffer=rng.choice([1, 3])) as it:

            async def consume() -> None:
                for _ in range(n):
                    ev = await it.receive()
                    if ev.data % 5 == 0:
                        await anyio.lowlevel.checkpoint()
                    seen.append(("iter", ev.data))

            tg.start_soon(consume)
            with anyio.fail_after(20):
                for batch in reads:
                    taken = d.push_many(batch)
                    deepest = max(deepest, d.depth)
                    while taken < len(batch):
                        await d.wait_room()
                        taken += d.push_many(batch[taken:])
                        deepest = max(deepest, d.depth)
                while d.depth or d.busy or len([x for x in seen if x[0] == "iter"]) < n:
                    await anyio.lowlevel.checkpoint()
        tg.cancel_scope.cancel()
    assert d.dropped == 0
    if bounded:
        assert deepest <= limit
    return seen, n


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.anyio
async def test_hand_over_with_backpressure_delivers_what_an_unbounded_inbox_does(seed: int) -> None:
    bounded, n = await _hand_over_scenario(seed, bounded=True)
    reference, _ = await _hand_over_scenario(seed, bounded=False)
    # Each consumer sees every event once, in order; only the interleaving may differ.
    for kind in ("sync", "slow", "iter"):
        mine = [x[1] for x in bounded if x[0] == kind]
        assert mine == [x[1] for x in reference if x[0] == kind] == list(range(n))
