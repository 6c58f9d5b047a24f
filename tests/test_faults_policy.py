"""The overflow policies and the accounting identity, on the pure router (no I/O).

``routed == sent + dropped + depth + in_flight`` must hold per queue after any sequence of
routes, writes that succeed, writes that fail (put back) and cut connections (discarded),
under every policy; the processes-and-signals version of these checks is in
test_faults_overload.py.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.messages import ALL
from shared.router import OverflowPolicy, Router, WorkerQueue


def _identity(q: WorkerQueue) -> None:
    assert q.routed == q.sent + q.dropped + len(q.frames) + q.in_flight


def test_disconnect_cuts_once_and_keeps_the_new_frame() -> None:
    router = Router(max_queue_len=3, expected_workers=1, overflow=OverflowPolicy.DISCONNECT)
    q = router.attach(0)
    cuts: list[int] = []
    q.on_overflow = lambda: cuts.append(len(q.frames))
    for i in range(4):
        router.route(None, ALL, b"%d" % i)
    assert cuts == [0]  # called after the backlog was cleared
    assert list(q.frames) == [b"3"]  # the frame that found the queue full is the first after
    assert (q.dropped, q.dropped_unreported, q.disconnects) == (3, 3, 1)
    # The callback is spent: until the next connection sets it, a full queue drops newest.
    for i in range(4, 8):
        router.route(None, ALL, b"%d" % i)
    assert list(q.frames) == [b"3", b"4", b"5"] and q.disconnects == 1
    _identity(q)
    st_ = router.statistics()
    assert st_.overflow_disconnects == 1 and st_.queues[0].overflow_disconnects == 1


def test_disconnected_queue_drops_newest_under_disconnect_policy() -> None:
    router = Router(max_queue_len=2, expected_workers=1, overflow=OverflowPolicy.DISCONNECT)
    for i in range(5):
        router.route(None, ALL, b"%d" % i)
    q = router.queues[0]
    assert list(q.frames) == [b"0", b"1"] and q.dropped == 3 and q.disconnects == 0


def test_detach_forgets_the_cut_callback() -> None:
    router = Router(max_queue_len=1, overflow=OverflowPolicy.DISCONNECT)
    q = router.attach(0)
    q.on_overflow = lambda: None
    router.detach(q)
    assert q.on_overflow is None


Op = tuple[str, int]


@settings(max_examples=200, deadline=None)
@given(
    policy=st.sampled_from(list(OverflowPolicy)),
    ops=st.lists(
        st.tuples(st.sampled_from(["route", "take", "sent", "fail", "cut", "attach", "detach", "expire"]),
                  st.integers(1, 40)),
        max_size=60,
    ),
)
def test_accounting_identity_under_any_history(policy: OverflowPolicy, ops: list[Op]) -> None:
    now = [0.0]
    router = Router(max_queue_len=5, expected_workers=2, queue_grace=1.0, overflow=policy, clock=lambda: now[0])
    router.attach(2)
    batch: dict[int, list[bytes]] = {}
    for op, n in ops:
        now[0] += 0.5
        queues = list(router.queues.values())
        q = queues[n % len(queues)]
        if op == "route":
            for i in range(n % 7):
                router.route(None, ALL, b"x" * (i + 1))
        elif op == "take" and q.worker_id not in batch and q.frames:
            batch[q.worker_id] = q.take_batch(max_bytes=n)
        elif op in ("sent", "fail", "cut") and q.worker_id in batch:
            taken = batch.pop(q.worker_id)
            if op == "sent":
                q.mark_sent(len(taken))
            elif op == "fail":
                q.put_back(taken)
            else:
                q.discard(taken)
        elif op == "attach":
            router.attach(n % 4).on_overflow = lambda: None
        elif op == "detach" and q.worker_id not in batch:
            router.detach(q)
        elif op == "expire":
            for wid in router.expire():
                batch.pop(wid, None)
        for each in router.queues.values():
            _identity(each)
            if each.worker_id not in batch:
                assert each.in_flight == 0
    stats = router.statistics()
    assert stats.routed == stats.sent + stats.dropped + stats.queued + stats.in_flight
