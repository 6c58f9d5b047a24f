from __future__ import annotations

import functools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.messages import ALL, OTHERS, RunKeys, Target, parse_target
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


# --- departed ids: muted after the broadcast grace, capped in number ----------------------


def test_departed_id_is_muted_after_the_broadcast_grace() -> None:
    r, clock = make(queue_grace=60.0, broadcast_grace=5.0)
    r.attach(0)
    q = r.attach(7)
    r.detach(q)
    r.route(0, ALL, b"within the grace")
    clock.now += 5
    assert r.expire() == []
    assert 7 not in r.queues and r.muted == {7: q}  # no longer fed broadcasts
    for i in range(3):
        assert r.route(0, ALL, b"%d" % i) == 1  # worker 0 only
    r.route_many(0, OTHERS, [b"a", b"b"])
    assert list(q.frames) == [b"within the grace"]  # nothing copied into the muted queue
    stats = r.statistics()
    seven = next(s for s in stats.queues if s.worker_id == 7)
    assert (seven.routed, seven.dropped, seven.depth) == (6, 5, 1)  # missed: counted, dropped
    assert (stats.queues_departed, stats.queues_muted) == (1, 1)
    assert stats.routed == stats.sent + stats.dropped + stats.queued + stats.in_flight
    assert r.attach(7) is q and 7 in r.queues and not r.muted
    assert q.dropped_unreported == 5  # the worker is told what it missed
    assert r.route(0, ALL, b"back") == 2 and list(q.frames) == [b"within the grace", b"back"]


def test_a_released_queue_is_retired_and_what_it_held_or_missed_is_abandoned_not_dropped() -> None:
    """A departed worker whose process ended (the broker's check, Broker._release_ended_processes)."""
    r, clock = make(queue_grace=60.0, broadcast_grace=5.0)
    r.attach(0)
    held, muted = r.attach(7), r.attach(8)
    r.detach(held)
    r.detach(muted)
    r.route(0, ALL, b"x")  # copied into both: within their broadcast grace
    clock.now += 5
    r.expire()
    r.attach(7)  # 7 came back, then left again: not muted
    r.detach(held)
    r.route(0, ALL, b"y")  # 7 takes it; 8 (muted) misses it
    before = r.statistics()
    assert not r.release(0) and not r.release(99)  # connected; unknown
    assert r.is_departed(7) and r.is_departed(8)
    assert r.release(7) and r.release(8)
    assert not r.release(7)
    assert not r.is_departed(7) and 7 not in r.queues and 8 not in r.muted
    stats = r.statistics()
    assert stats.queues_released == 2 and stats.queues_departed == 0
    # 7 held x and y; 8 held x and missed y (counted as missed only if a snapshot came
    # while it was muted: `before` did, so that one stays a drop, counters never go down)
    assert stats.dropped == before.dropped == 1
    assert stats.abandoned == 3
    assert stats.routed == stats.sent + stats.dropped + stats.abandoned + stats.queued + stats.in_flight
    assert r.route(0, ALL, b"z") == 1  # worker 0 only


def test_a_worker_target_still_reaches_a_muted_queue() -> None:
    r, clock = make(broadcast_grace=1.0)
    r.detach(r.attach(7))
    clock.now += 1
    r.expire()
    assert r.route(0, parse_target("worker:7"), b"direct") == 1
    assert list(r.muted[7].frames) == [b"direct"] and r.unroutable == 0


def test_unique_never_picks_a_muted_queue() -> None:
    r, clock = make(broadcast_grace=1.0)
    r.detach(r.attach(7))
    clock.now += 1
    r.expire()
    assert r.route(0, parse_target("unique:k"), b"u") == 0
    assert r.unroutable == 1 and not r.muted[7].frames


def test_expected_ids_are_never_muted() -> None:
    r, clock = make(expected_workers=2, broadcast_grace=1.0)
    r.detach(r.attach(1))
    clock.now += 100
    r.expire()
    assert set(r.queues) == {0, 1} and not r.muted
    assert r.route(None, ALL, b"x") == 2


def test_departed_queues_are_capped_oldest_retired_first() -> None:
    r, clock = make(max_departed_queues=2, expected_workers=1)
    for wid in (10, 11, 12):
        r.attach(wid)
    r.route(None, ALL, b"queued")
    assert r.detach(r.queues[11]) == []
    clock.now += 1
    assert r.detach(r.queues[10]) == []
    clock.now += 1
    r.detach(r.queues[0])  # an expected id does not count
    assert r.detach(r.queues[12]) == [11]  # the one that left first
    assert set(r.queues) == {0, 10, 12}
    stats = r.statistics()
    assert stats.queues_evicted == 1 and stats.queues_departed == 2
    assert stats.dropped == 1  # what the retired queue held
    assert stats.routed == stats.sent + stats.dropped + stats.queued + stats.in_flight


def test_a_returning_id_leaves_the_departed_list() -> None:
    r, _ = make(max_departed_queues=1)
    r.detach(r.attach(1))
    r.attach(1)  # back before anyone else left
    assert r.detach(r.attach(2)) == []
    assert r.detach(r.queues[1]) == [2]


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="broadcast_grace"):
        Router(broadcast_grace=-1)
    with pytest.raises(ValueError, match="max_departed_queues"):
        Router(max_departed_queues=-1)


def _history_router(grace: float, policy: OverflowPolicy) -> tuple[Router, Clock]:
    return make(
        expected_workers=2, max_queue_len=4, queue_grace=6.0, broadcast_grace=grace,
        max_departed_queues=3, overflow=policy,
    )


@settings(max_examples=200, deadline=None)
@given(
    policy=st.sampled_from(list(OverflowPolicy)),
    ops=st.lists(
        st.tuples(
            st.sampled_from(
                ["all", "others", "worker", "attach", "detach", "tick", "take", "retry", "cut", "stats"]
            ),
            st.integers(0, 7),
            st.integers(1, 5),
        ),
        max_size=80,
    ),
)
def test_muting_only_counts_what_a_slow_path_would_have_copied(policy: OverflowPolicy, ops: list[tuple[str, int, int]]) -> None:
    """Against the same history on a router that never mutes: every id is offered exactly
    the same frames (``routed``), the identity holds in every snapshot, and a broadcast only
    touches expected, connected or recently departed queues."""
    muting, clock = _history_router(1.0, policy)
    never, clock2 = _history_router(1e9, policy)
    for op, wid, n in ops:
        for r, c in ((muting, clock), (never, clock2)):
            if op in ("all", "others"):
                r.route_many(wid, ALL if op == "all" else OTHERS, [b"f%d" % i for i in range(n)])
            elif op == "worker":
                r.route(wid, parse_target(f"worker:{n}"), b"w")
            elif op == "attach":
                r.attach(wid)
            elif op == "detach" and wid in r.queues and r.queues[wid].connected:
                r.detach(r.queues[wid])
            elif op == "tick":
                c.now += n * 0.5
                r.expire()
            elif op == "take":
                q = r.queues.get(wid) or r.muted.get(wid)
                if q is not None and q.frames:
                    q.mark_sent(len(q.take_batch(n)))
            elif op in ("retry", "cut"):
                # A failed write: the batch goes back (and may leave the queue over
                # max_len, which the next runs must handle), or is dropped when cut off.
                q = r.queues.get(wid) or r.muted.get(wid)
                if q is not None and q.frames:
                    batch = q.take_all() if n == 5 else q.take_batch(n)
                    (q.put_back if op == "retry" else q.discard)(batch)
            elif op == "stats":
                r.statistics()
        for q in muting.queues.values():
            assert q.connected or q.expected or clock.now - q.idle_since < 1.0
            assert q.in_flight == 0  # every batch taken above has landed (sent, back, cut)
    a, b = muting.statistics(), never.statistics()
    assert a.routed == a.sent + a.dropped + a.queued + a.in_flight
    assert [(q.worker_id, q.routed) for q in a.queues] == [(q.worker_id, q.routed) for q in b.queues]
    assert (a.queues_expired, a.queues_evicted) == (b.queues_expired, b.queues_evicted)
    for q in [*muting.queues.values(), *muting.muted.values()]:
        assert q.routed == q.sent + q.dropped + len(q.frames) + q.in_flight
        assert q.dropped_unreported <= q.dropped


@settings(max_examples=300, deadline=None)
@given(
    policy=st.sampled_from([OverflowPolicy.DROP_NEWEST, OverflowPolicy.DROP_OLDEST]),
    ops=st.lists(
        st.tuples(st.sampled_from(["push", "take", "send", "retry", "cut"]), st.integers(1, 7)),
        max_size=60,
    ),
)
def test_queue_accounting_under_failed_writes(policy: OverflowPolicy, ops: list[tuple[str, int]]) -> None:
    """One queue's writer life (take, then send, retry or cut) with runs pushed in between:
    ``push_many`` leaves exactly what one ``push`` at a time leaves, also when a put_back
    left the queue over ``max_len``; nothing lands that was not in flight (the queue
    asserts it); and ``routed == sent + dropped + queued + in_flight`` after every step."""
    fast = Router(max_queue_len=4).attach(0)
    slow = Router(max_queue_len=4).attach(0)
    batches: list[tuple[list[bytes], list[bytes]]] = []
    tag = 0
    for op, n in ops:
        if op == "push":
            run = [b"%d" % (tag + i) for i in range(n)]
            tag += n
            assert fast.push_many(run, policy) == sum(slow.push(f, policy) for f in run)
        elif op == "take" and fast.frames:
            batches.append((fast.take_batch(n), slow.take_batch(n)))  # n bytes: 1+ frames
        elif batches and op in ("send", "retry", "cut"):
            a, b = batches.pop()
            for q, batch in ((fast, a), (slow, b)):
                if op == "send":
                    q.mark_sent(len(batch))
                elif op == "retry":
                    q.put_back(batch)
                else:
                    q.discard(batch)
        for q in (fast, slow):
            assert q.routed == q.sent + q.dropped + len(q.frames) + q.in_flight
            assert 0 <= q.in_flight and q.dropped_unreported <= q.dropped
        assert list(fast.frames) == list(slow.frames) and fast.dropped == slow.dropped


def test_landing_more_than_is_in_flight_is_a_bug_not_a_clamp() -> None:
    q = Router(max_queue_len=4).attach(0)
    q.push(b"a", OverflowPolicy.DROP_NEWEST)
    batch = q.take_batch()
    q.mark_sent(len(batch))
    with pytest.raises(AssertionError, match="in flight"):
        q.put_back(batch)  # the same batch reported twice


# --- one read's runs, grouped per queue (Router.route_runs) ------------------------------

_KEYS = [None, ("a", "x"), ("a", "y"), ("b", "x"), ("workerbus", "joined")]
_FILTERS = [None, frozenset(), frozenset({("a", "*")}), frozenset({("b", "x"), ("a", "y")}), frozenset({("*", "*")})]


def route_frame_by_frame(
    r: Router, publisher: int, runs: list[tuple[Target, list[bytes]]], keys: list[RunKeys | None]
) -> int:
    """The reference: every frame of every run routed on its own, with its own key, in read order."""
    return sum(r.route(publisher, target, frame, None if rk is None else rk.key_of(i))
               for (target, frames), rk in zip(runs, keys, strict=True) for i, frame in enumerate(frames))  # fmt: skip


def run_keys(per_frame: list[tuple[str, str] | None]) -> RunKeys | None:
    """What decode_publish_batch makes of a run's keys: distinct, in order of appearance."""
    names: list[tuple[str, str] | None] = []
    for key in per_frame:
        if key not in names:
            names.append(key)
    return None if names == [None] else RunKeys(names, [names.index(key) for key in per_frame])


def _contents(r: Router) -> dict[int, list[bytes]]:
    return {wid: list(q.frames) for wid, q in [*r.queues.items(), *r.muted.items()]}


def _grouping_router(policy: OverflowPolicy, filters: list[int]) -> tuple[Router, Clock, list[int]]:
    r, clock = make(expected_workers=2, max_queue_len=5, broadcast_grace=1.0, overflow=policy)
    cuts: list[int] = []
    for wid, f in enumerate(filters):
        q = r.attach(wid)
        r.set_filter(q, _FILTERS[f])
        if policy is OverflowPolicy.DISCONNECT:
            q.on_overflow = functools.partial(cuts.append, wid)
    return r, clock, cuts


@settings(max_examples=300, deadline=None)
@given(
    policy=st.sampled_from(list(OverflowPolicy)),
    filters=st.lists(st.integers(0, len(_FILTERS) - 1), min_size=1, max_size=6),
    reads=st.lists(
        st.tuples(
            st.integers(0, 6),  # publisher (an id may have no queue, or a muted one)
            st.lists(
                st.tuples(
                    st.sampled_from(["all", "others", "worker:1", "worker:4", "unique:k", "unique:j"]),
                    # one key per frame: a run of one pair, or of several (a publisher
                    # cycling through sources), plain publishes among them
                    st.lists(st.integers(0, len(_KEYS) - 1), min_size=1, max_size=6),
                ),
                max_size=12,
            ),
            st.sampled_from(["", "take", "detach", "tick", "refilter"]),
        ),
        max_size=8,
    ),
)
def test_grouped_runs_equal_frame_by_frame_routing(
    policy: OverflowPolicy, filters: list[int], reads: list[tuple[int, list[tuple[str, list[int]]], str]]
) -> None:
    """Each queue ends with the same frames in the same order, and every counter (routed,
    dropped, filtered, deliveries, unique picks, cuts) is the same, as routing each frame
    alone: under every overflow policy, with filters, muted and absent ids."""
    grouped, c1, cuts1 = _grouping_router(policy, filters)
    single, c2, cuts2 = _grouping_router(policy, filters)
    tapped: tuple[list[tuple[int, str, bytes]], list[tuple[int, str, bytes]]] = ([], [])
    grouped.taps.append(lambda p, t, f: tapped[0].append((p, str(t), f)))
    single.taps.append(lambda p, t, f: tapped[1].append((p, str(t), f)))
    serial = 0
    for publisher, spec, after in reads:
        runs: list[tuple[Target, list[bytes]]] = []
        keys: list[RunKeys | None] = []
        for target, per_frame in spec:
            n = len(per_frame)
            runs.append((parse_target(target), [b"%d" % (serial + i) for i in range(n)]))
            keys.append(run_keys([_KEYS[k] for k in per_frame]))
            serial += n
        landed = grouped.route_runs(publisher, runs, keys)
        assert landed == route_frame_by_frame(single, publisher, runs, keys)
        for r, clock in ((grouped, c1), (single, c2)):
            q = r.queues.get(publisher)
            if after == "take" and q is not None and q.frames:
                q.mark_sent(len(q.take_batch(3)))
            elif after == "detach" and q is not None and q.connected:
                r.detach(q)
            elif after == "tick":
                clock.now += 0.7
                r.expire()
            elif after == "refilter" and q is not None and q.connected:
                # (what was worked out for the old filters must not be used again)
                r.set_filter(q, _FILTERS[(_FILTERS.index(q.filter) + 1) % len(_FILTERS)])
        assert _contents(grouped) == _contents(single)
    assert grouped.statistics() == single.statistics()
    assert tapped[0] == tapped[1]
    # The same connections are cut, as often; only the order of the (socket-closing)
    # callbacks between queues may differ, since each queue takes its runs at once.
    assert sorted(cuts1) == sorted(cuts2)
    s = grouped.statistics()
    assert s.routed == s.sent + s.dropped + s.queued + s.in_flight
