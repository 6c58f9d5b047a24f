from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.messages import ALL, OTHERS, parse_target
from shared.router import OverflowPolicy, Router


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(**kw: object) -> tuple[Router, Clock]:
    clock = Clock()
    return Router(clock=clock, rng=random.Random(1), **kw), clock  # type: ignore[arg-type]


def test_all_others_worker() -> None:
    r, _ = make(expected_workers=3)
    for wid in (0, 1, 2):
        r.attach(wid)
    assert r.route(0, ALL, b"a") == 3
    assert r.route(0, OTHERS, b"o") == 2
    assert r.route(0, parse_target("worker:2"), b"w") == 1
    assert r.route(0, parse_target("worker:9"), b"x") == 0
    assert [list(r.queues[w].frames) for w in (0, 1, 2)] == [[b"a"], [b"a", b"o"], [b"a", b"o", b"w"]]
    assert r.unroutable == 1


def test_same_bytes_object_in_every_queue() -> None:
    r, _ = make(expected_workers=4)
    frame = b"x" * 100
    r.route(0, ALL, frame)
    assert all(q.frames[0] is frame for q in r.queues.values())


def test_unique_dedup_and_timeout() -> None:
    r, clock = make(expected_workers=4, unique_timeout=5.0)
    for wid in range(4):
        r.attach(wid)
    key = parse_target("unique:k")
    assert r.route(0, key, b"1") == 1
    assert r.route(1, key, b"2") == 0
    clock.now += 4.9
    assert r.route(2, key, b"3") == 0
    clock.now += 0.2
    assert r.route(3, key, b"4") == 1
    assert r.unique_duplicates == 2
    assert sum(len(q.frames) for q in r.queues.values()) == 2


def test_unique_prefers_connected_workers() -> None:
    r, _ = make(expected_workers=4)
    r.attach(2)
    for i in range(20):
        r.route(0, parse_target(f"unique:{i}"), b"u")
    assert len(r.queues[2].frames) == 20


def test_unique_key_cap_counts_evictions() -> None:
    r, _ = make(expected_workers=1, max_unique_keys=2)
    for key in ("a", "b", "c"):
        r.route(0, parse_target(f"unique:{key}"), b"u")
    assert r.unique_evicted == 1
    assert r.route(0, parse_target("unique:a"), b"u") == 1  # evicted early, so it passes again


@pytest.mark.parametrize("policy", list(OverflowPolicy))
def test_overflow_is_counted(policy: OverflowPolicy) -> None:
    r, _ = make(expected_workers=1, max_queue_len=2, overflow=policy)
    for frame in (b"1", b"2", b"3"):
        r.route(0, ALL, frame)
    q = r.queues[0]
    expected = [b"2", b"3"] if policy is OverflowPolicy.DROP_OLDEST else [b"1", b"2"]
    assert list(q.frames) == expected
    assert q.dropped == 1 and q.dropped_unreported == 1
    assert r.statistics().dropped == 1


def test_queues_outlive_disconnect_then_expire() -> None:
    r, clock = make(queue_grace=30.0)
    q = r.attach(7)
    r.detach(q)
    r.route(1, ALL, b"while away")
    assert r.attach(7) is q and list(q.frames) == [b"while away"]
    r.detach(q)
    clock.now += 29
    assert r.expire() == []
    clock.now += 2
    assert r.expire() == [7]
    assert 7 not in r.queues
    assert r.statistics().dropped == 1  # what was still queued counts as dropped


def test_expected_queues_never_expire() -> None:
    r, clock = make(expected_workers=2, queue_grace=1.0)
    clock.now += 1000
    assert r.expire() == []
    assert set(r.queues) == {0, 1}


def test_put_back_keeps_order_and_wakes() -> None:
    r, _ = make(expected_workers=1)
    q = r.queues[0]
    for f in (b"1", b"2", b"3"):
        r.route(0, ALL, f)
    batch = q.take_all()
    r.route(0, ALL, b"4")
    woke: list[int] = []
    q.wakeup = lambda: woke.append(1)
    q.put_back(batch)
    assert list(q.frames) == [b"1", b"2", b"3", b"4"] and woke == [1]


def test_taps_see_local_publishes_only() -> None:
    r, _ = make(expected_workers=1)
    seen: list[tuple[int, str, bytes]] = []
    r.taps.append(lambda wid, t, f: seen.append((wid, str(t), f)))
    r.route(0, ALL, b"local")
    r.route(None, ALL, b"injected")
    assert seen == [(0, "all", b"local")]


def test_current_is_never_routed() -> None:
    r, _ = make()
    with pytest.raises(ValueError):
        r.route(0, parse_target("current"), b"x")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["all", "others", "worker:1", "unique:k"])), max_size=60))
def test_accounting_identity(ops: list[tuple[int, str]]) -> None:
    r, clock = make(expected_workers=4, max_queue_len=5)
    for wid, target in ops:
        clock.now += 1.0
        r.route(wid, parse_target(target), b"f")
    for q in r.queues.values():
        assert q.enqueued == len(q.frames) + (q.dropped if r.overflow is OverflowPolicy.DROP_OLDEST else 0)
    stats = r.statistics()
    assert stats.deliveries == sum(q.enqueued for q in stats.queues)
