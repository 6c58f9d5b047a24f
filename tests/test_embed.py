"""The embedded bus: ids, election, failover, lifecycle events and loss detection.

Several members share one event loop here (a flock conflicts between two open files of
one process just as between two processes); tests/test_embed_processes.py kills real
processes.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any

import anyio
import pytest

from shared.broker import LIFECYCLE_SOURCE, Broker
from shared.election import (
    FileLock,
    WorkerIdUnavailable,
    claim_worker_id,
    held_worker_ids,
    lock_path,
    workers_from_env,
)
from shared.embed import EmbeddedClient, join
from shared.errors import PayloadTooLarge
from shared.messages import Target, TargetKind
from shared.router import OverflowPolicy, WorkerQueue
from shared.sequence import SequenceIn, SequenceOut
from tests.helpers import Recorder, wait_until

pytestmark = pytest.mark.anyio


def _path(address: str) -> str:
    return address[len("unix:") :]


class Member:
    """One embedded worker in this process, with a recorder and a way to make it leave."""

    def __init__(self, bus: EmbeddedClient, recorder: Recorder):
        self.bus = bus
        self.recorder = recorder
        self.stopping = anyio.Event()

    def stop(self) -> None:
        """Leave the bus the way a server's shutdown does: the context manager exits.

        (Cancelling a scope around a client instead can trip an asyncio race in anyio's
        socket streams: a readiness callback that sets a future cancelled in the same
        loop iteration.)
        """
        self.stopping.set()

    def lifecycle(self, name: str) -> list[Any]:
        return [e[2] for e in self.recorder.events if e[0] == LIFECYCLE_SOURCE and e[1] == name]

    def user_events(self) -> list[tuple[str, str, Any, int | None]]:
        return [e for e in self.recorder.events if e[0] != LIFECYCLE_SOURCE]


@asynccontextmanager
async def members(address: str, count: int, **options: Any) -> AsyncIterator[list[Member]]:
    """Start ``count`` members one after another; each leaves when its stop() is called."""
    out: list[Member] = []
    async with anyio.create_task_group() as tg:

        async def run(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            async with join(address, **options) as bus:
                member = Member(bus, Recorder())
                bus.subscribe("*", "*", member.recorder)
                out.append(member)
                task_status.started()
                await member.stopping.wait()

        for _ in range(count):
            await tg.start(run)
        with anyio.fail_after(5):
            for m in out:
                await m.bus.wait_ready()
        yield out
        for m in out:
            m.stop()


def hosts(ms: list[Member]) -> list[Member]:
    return [m for m in ms if m.bus.is_broker and not m.stopping.is_set()]


# --- election building blocks (synchronous) ---------------------------------------------


def test_worker_ids_lowest_free_and_reused(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "bus.sock")
    claims = [claim_worker_id(path, 3) for _ in range(3)]
    assert [c[0] for c in claims if c] == [0, 1, 2]
    assert claim_worker_id(path, 3) is None
    assert held_worker_ids(path, 3) == [0, 1, 2]
    assert claims[1] is not None
    claims[1][1].release()  # worker 1 "dies"
    assert held_worker_ids(path, 3) == [0, 2]
    again = claim_worker_id(path, 3)
    assert again is not None and again[0] == 1
    for c in [*claims, again]:
        if c:
            c[1].release()


def test_lock_record_round_trip(sock_dir: str) -> None:
    lock = FileLock.acquire(lock_path(os.path.join(sock_dir, "bus.sock")))
    assert lock is not None
    assert lock.read_record() == {}
    lock.write_record({"pid": 1, "generation": 7})
    assert lock.read_record() == {"pid": 1, "generation": 7}
    assert FileLock.acquire(lock.path) is None
    lock.release()
    lock.release()  # idempotent
    again = FileLock.acquire(lock.path)
    assert again is not None and again.read_record()["generation"] == 7
    again.release()


def test_forked_child_does_not_keep_the_lock(sock_dir: str) -> None:
    lock = FileLock.acquire(os.path.join(sock_dir, "x.lock"))
    assert lock is not None
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os._exit(0 if lock.fd is None else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert lock.held
    lock.release()


def test_workers_from_env() -> None:
    assert workers_from_env({"WEB_CONCURRENCY": "4"}) == 4
    assert workers_from_env({"WEB_CONCURRENCY": " 8 "}) == 8
    for bad in ("", "0", "-2", "four", "2.5"):
        assert workers_from_env({"WEB_CONCURRENCY": bad}) is None
    assert workers_from_env({}) is None


# --- sequence bookkeeping ---------------------------------------------------------------


def test_sequence_out_numbers_streams_and_rolls_back() -> None:
    out = SequenceOut()
    assert out.assign(Target(TargetKind.ALL)) == ("sb", 1)
    assert out.assign(Target(TargetKind.OTHERS)) == ("sb", 2)
    assert out.assign(Target(TargetKind.WORKER, worker_id=3)) == ("sw", 1)
    out.rollback()
    assert out.assign(Target(TargetKind.WORKER, worker_id=3)) == ("sw", 1)
    out.commit()
    out.rollback()  # nothing pending: no-op
    assert out.assign(Target(TargetKind.UNIQUE, key="k")) is None
    assert out.marks() == {"sb": 2, "sw": [[3, 1]]}


def test_sequence_in_gaps_markers_drops_and_restarts() -> None:
    seq = SequenceIn(worker_id=1)
    assert seq.event(0, "sb", 1) == 0  # baseline
    assert seq.event(0, "sb", 2) == 0
    assert seq.event(0, "sb", 5) == 2  # 3 and 4 missing
    assert seq.sync(0, {"sb": 7, "sw": []}) == 2  # 6 and 7 died with a broker
    seq.dropped(3)  # the broker owned up to three drops
    assert seq.event(0, "sb", 10) == 0  # 8, 9 explained by the drops
    assert seq.unexplained_drops == 1
    assert seq.event(1, "sb", 50) == 0  # our own stream is never checked
    assert seq.sync(2, {"sb": 4, "sw": [[1, 3], [5, 9]]}) == 0  # baselines only
    assert seq.event(2, "sw", 6) == 1  # 4, 5 missing, one explained
    seq.joined(0, pid=100)
    seq.joined(0, pid=200)  # a new process under id 0 starts over
    assert seq.event(0, "sb", 1) == 0
    assert seq.event(0, "sb", 3) == 1
    assert seq.lost == 2 + 2 + 1 + 1


class _BlackHole(WorkerQueue):
    __slots__ = ()

    def push(self, frame: bytes, policy: OverflowPolicy) -> bool:
        return True


# --- members in one process --------------------------------------------------------------


async def test_one_host_and_events_cross(address: str, transport: str) -> None:
    async with members(address, 3, workers=3, transport=transport) as ms:
        assert sorted(m.bus.worker_id for m in ms) == [0, 1, 2]
        assert len(hosts(ms)) == 1
        await ms[2].bus.publish("cache", "purge", {"k": 1})
        await ms[0].bus.publish("cache", "one", None, "worker:1")
        await ms[1].bus.publish("cache", "rest", None, "others")
        for m in ms:
            await wait_until(partial(lambda m: len(m.user_events()) >= 2, m))
        # three publishers: each one's order holds, the interleaving is the broker's
        by_id = {m.bus.worker_id: sorted(e[1] for e in m.user_events()) for m in ms}
        assert by_id == {0: ["purge", "rest"], 1: ["one", "purge"], 2: ["purge", "rest"]}
        for m in ms:
            assert m.lifecycle("welcome")[0]["broker"]["generation"] >= 1
            assert m.bus.lost == 0
            # the sequence check reads unpacked objects: granted "unframed" (§8)
            assert m.bus.welcome is not None and "unframed" in m.bus.welcome.caps


async def test_all_ids_held_waits_then_fails(address: str) -> None:
    async with members(address, 2, workers=2):
        with pytest.raises(WorkerIdUnavailable):
            async with join(address, workers=2, id_timeout=0.2):
                pass


async def test_unknown_worker_count_claims_lowest_free(address: str) -> None:
    async with members(address, 3) as ms:
        assert sorted(m.bus.worker_id for m in ms) == [0, 1, 2]
        ms[1].stop()
        await wait_until(lambda: 1 not in held_worker_ids(_path(address), 8))
        async with join(address) as again:
            assert again.worker_id == 1  # the freed id is re-used


async def test_host_leaves_another_takes_over(address: str, transport: str) -> None:
    async with members(address, 3, workers=3, transport=transport) as ms:
        (old,) = hosts(ms)
        old.stop()
        rest = [m for m in ms if m is not old]
        await wait_until(lambda: len(hosts(rest)) == 1 and all(m.bus.is_ready for m in rest))
        (new,) = hosts(rest)
        await new.bus.publish("after", "move", 1)
        for m in rest:
            await wait_until(partial(lambda m: any(e[1] == "move" for e in m.user_events()), m))
            await wait_until(partial(lambda m: len(m.lifecycle("broker-moved")) == 1, m))
            moved = m.lifecycle("broker-moved")[0]
            assert moved["worker_id"] == new.bus.worker_id
            assert moved["previous"]["worker_id"] == old.bus.worker_id
            assert moved["generation"] == moved["previous"]["generation"] + 1
        # the survivors saw the old host leave through the old broker (it drained first)
        other = next(m for m in rest if m is not new)
        assert any(d["worker_id"] == old.bus.worker_id for d in other.lifecycle("left"))


async def test_publishes_during_the_gap_arrive(address: str) -> None:
    async with members(address, 3, workers=3) as ms:
        (old,) = hosts(ms)
        rest = [m for m in ms if m is not old]
        old.stop()
        await wait_until(lambda: not rest[0].bus.is_ready)
        for i in range(20):
            rest[0].bus.publish_nowait("gap", "n", i)
        await wait_until(lambda: len(hosts(rest)) == 1)
        for m in rest:
            await wait_until(partial(lambda m: len([e for e in m.user_events() if e[0] == "gap"]) == 20, m))
            assert [e[2] for e in m.user_events() if e[0] == "gap"] == list(range(20))
            assert m.bus.lost == 0


async def test_joined_and_left_events(address: str) -> None:
    async with members(address, 2, workers=3) as ms:
        async with join(address, workers=3) as third:
            assert third.worker_id == 2
            await wait_until(lambda: any(d["worker_id"] == 2 for d in ms[0].lifecycle("joined")))
        await wait_until(lambda: any(d["worker_id"] == 2 for d in ms[0].lifecycle("left")))
        joined = next(d for d in ms[0].lifecycle("joined") if d["worker_id"] == 2)
        assert joined["pid"] == os.getpid()


async def test_payload_too_large_leaves_no_gap(address: str) -> None:
    async with members(address, 2, workers=2) as ms:
        with pytest.raises(PayloadTooLarge):
            await ms[0].bus.publish("big", "blob", b"x" * 70000)
        with pytest.raises(PayloadTooLarge):
            ms[0].bus.publish_nowait("big", "blob", b"x" * 70000)
        await ms[0].bus.publish("small", "one", 1)
        await wait_until(lambda: any(e[0] == "small" for e in ms[1].user_events()))
        assert ms[1].bus.lost == 0


async def test_loss_in_a_dead_broker_is_reported(address: str) -> None:
    # The test hosts the brokers itself (holding the election lock), so it can make one
    # swallow publishes the way a killed broker loses what sat in its memory.
    lock = FileLock.acquire(lock_path(_path(address)))
    assert lock is not None
    received: list[tuple[str, str, Any]] = []

    def serve(broker: Broker) -> Callable[..., Any]:
        return broker.serve

    try:
        async with AsyncExitStack() as stack:
            tg = await stack.enter_async_context(anyio.create_task_group())
            first = Broker(transport="http", expected_workers=2, lifecycle_events=True)
            first.identity["generation"] = 1
            scope = anyio.CancelScope()

            async def run_first() -> None:
                with scope:
                    await first.serve(address)

            tg.start_soon(run_first)
            pub = await stack.enter_async_context(EmbeddedClient(address, transport="http", worker_id=0, workers=2))
            sub = await stack.enter_async_context(EmbeddedClient(address, transport="http", worker_id=1, workers=2))
            sub.subscribe("*", "*", lambda d, e, s, w: received.append((s, e, d)))
            with anyio.fail_after(5):
                await pub.wait_ready()
                await sub.wait_ready()
            await pub.publish("n", "1")
            await wait_until(lambda: ("n", "1", None) in received)
            # From now on the first broker accepts events for worker 1 into a queue that
            # is never sent: what a killed broker does with what it had queued.
            first.router.queues[1] = _BlackHole(1, 16, expected=True, now=0.0)
            await pub.publish("n", "2")
            await pub.publish("n", "3")
            await pub.flush()  # the barrier: both are routed (into the black hole) now
            scope.cancel()
            await wait_until(lambda: not sub.is_ready)
            second = Broker(transport="http", expected_workers=2, lifecycle_events=True)
            second.identity["generation"] = 2
            await tg.start(serve(second), address)
            await pub.publish("n", "4")
            await wait_until(lambda: ("n", "4", None) in received)
            await wait_until(lambda: bool([d for s, e, d in received if e == "lost"]))
            lost = [d for s, e, d in received if e == "lost"]
            assert lost == [{"count": 2, "wid": 0, "total": 2}]
            assert sub.lost == 2
            assert any(e == "broker-moved" for s, e, d in received)
            tg.cancel_scope.cancel()
    finally:
        lock.release()
