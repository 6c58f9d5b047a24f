"""Routing and queue cases: unique dedup, worker/others targets, per-id queues.

Negative checks ("B must NOT get it") need no sleeping: after the event under test the
publisher sends a target-all marker, and since the broker keeps one global order, a worker
that reaches the marker without the event never gets it.
"""

from __future__ import annotations

import time

from shared.tools.conformance.casekit import CaseFailed, CaseSkipped, Ctx, case
from shared.tools.conformance.cases_frames import ORDER_EVENTS, check_order
from shared.tools.conformance.wire import Conn

TARGET_EXTENSION = "worker/others targets are native-profile extensions"


def _connected(ctx: Ctx, n: int) -> tuple[list[int], list[Conn]]:
    ids = [ctx.id0 + i for i in range(n)]
    return ids, ctx.join(ids)


def _unique_round(ctx: Ctx, key: str, ids: list[int], conns: list[Conn], tag: str) -> None:
    """Publish ``key`` three times (two publishers); exactly one delivery must result."""
    a, b = conns[0], conns[1]
    dups = [ctx.event(ids[0], f"{tag}-1"), ctx.event(ids[0], f"{tag}-2"),
            ctx.event(ids[1], f"{tag}-3")]
    marks = [ctx.event(ids[0], f"{tag}-marker-a"), ctx.event(ids[1], f"{tag}-marker-b")]
    a.send(ctx.publish_frame({"unique": key}, dups[0]) + ctx.publish_frame({"unique": key}, dups[1])
           + ctx.publish_frame({}, marks[0]))
    b.send(ctx.publish_frame({"unique": key}, dups[2]) + ctx.publish_frame({}, marks[1]))
    seen: dict[int, list[bytes]] = {}
    for conn, wid in zip(conns, ids, strict=True):
        got = ctx.collect(conn, marks[0], f"worker {wid}")
        if marks[1] not in got:
            got += ctx.collect(conn, marks[1], f"worker {wid}")
        seen[wid] = [f for f in got if f in dups]
    total = sum(len(v) for v in seen.values())
    if total != 1:
        report = ", ".join(f"{w}: {ctx.describe(v)}" for w, v in seen.items())
        raise CaseFailed(
            f"published 3 events with unique key {key!r} within the timeout, expected exactly "
            f"one delivery among the {len(ids)} connected workers, got {total} ({report})"
        )


@case("unique.dedup", "same unique key 3x within the timeout -> exactly one delivery; after "
      "--unique-timeout the key is delivered once again")
def unique(ctx: Ctx) -> None:
    # A unique event goes to one *connected* worker; let the broker notice that the earlier
    # cases' connections are gone, or it may pick one of those.
    ids, conns = _connected(ctx, 3)
    ctx.settle(conns[0], ids[0])
    key = ctx.tagged("key")
    _unique_round(ctx, key, ids, conns, "first")
    # Counted from the last publish, in case the broker restarts the window on a duplicate;
    # the margin absorbs timer granularity.
    # A real wait, on purpose: the broker's own timer is what is tested, and a black-box
    # kit cannot move the broker's clock.
    margin = max(0.2, ctx.cfg.unique_timeout * 0.1)
    time.sleep(ctx.cfg.unique_timeout + margin)
    ctx.deadline = time.monotonic() + ctx.cfg.case_timeout
    _unique_round(ctx, key, ids, conns, "after-timeout")


@case("target.worker", "spec {worker: B}: only B gets it", native_only=TARGET_EXTENSION)
def target_worker(ctx: Ctx) -> None:
    ids, conns = _connected(ctx, 3)
    event = ctx.event(ids[0], "to-worker")
    marker = ctx.event(ids[0], "marker")
    conns[0].send(ctx.publish_frame({"worker": ids[1]}, event) + ctx.publish_frame({}, marker))
    ctx.expect(conns[1], [event, marker], f"target worker {ids[1]}")
    ctx.expect(conns[0], [marker], f"publisher {ids[0]}")
    ctx.expect(conns[2], [marker], f"other worker {ids[2]}")


@case("target.others", "spec {others: true}: everyone but the publisher's id", native_only=TARGET_EXTENSION)
def target_others(ctx: Ctx) -> None:
    ids, conns = _connected(ctx, 3)
    event = ctx.event(ids[0], "to-others")
    marker = ctx.event(ids[0], "marker")
    conns[0].send(ctx.publish_frame({"others": True}, event) + ctx.publish_frame({}, marker))
    ctx.expect(conns[0], [marker], f"publisher {ids[0]}")
    for conn, wid in zip(conns[1:], ids[1:], strict=True):
        ctx.expect(conn, [event, marker], f"worker {wid}")


@case("queue.late-joiner", "worker X connects, leaves; an all-publish meanwhile is delivered "
      "when X reconnects")
def late_joiner(ctx: Ctx) -> None:
    ids, conns = _connected(ctx, 2)
    x, p = ids
    # A polite leave: once the broker closed its side too, it has seen the worker go, so
    # the next publish is queued for it (a plain close races with that publish).
    if not conns[0].leave(ctx.deadline):
        raise CaseFailed(f"worker {x}: half-closed its connection, the broker did not close "
                         f"its side within {ctx.cfg.case_timeout:g}s")
    event = ctx.event(p, "while-away")
    ctx.publish(conns[1], {}, event)
    ctx.expect(conns[1], [event], f"publisher {p}")
    ctx.expect(ctx.worker(x), [event], f"reconnected worker {x}")


@case("queue.pre-created", "with --workers N: the broker's pre-created id N-1 gets an event "
      "published while it is not connected (the kit connects as id N-1)")
def pre_created(ctx: Ctx) -> None:
    if not ctx.cfg.workers:
        raise CaseSkipped("needs --workers N (the broker's own --workers) to know a pre-created id")
    late = ctx.cfg.workers - 1
    ids, conns = _connected(ctx, 1)
    event = ctx.event(ids[0], "before-join")
    ctx.publish(conns[0], {}, event)
    ctx.expect(conns[0], [event], f"publisher {ids[0]}")
    # The queue of N-1 also holds every earlier target-all event: read up to ours.
    ctx.collect(ctx.worker(late), event, f"late worker {late}")


@case("order.pre-created-ids", f"with --workers N: the order case on the broker's own ids "
      f"0..N-1 (ids 0 and 1 publish {ORDER_EVENTS} events each, every id receives them): the "
      "same total order everywhere, each publisher's events in publish order")
def order_pre_created(ctx: Ctx) -> None:
    # The other cases keep to ids far above 0..N-1; a broker that keeps its pre-created
    # queues differently (where real workers live) would go unnoticed without this one.
    if not ctx.cfg.workers:
        raise CaseSkipped("needs --workers N (the broker's own --workers) to know its worker ids")
    own = list(range(ctx.cfg.workers))
    pubs = own[:2] if len(own) >= 2 else [own[0], ctx.id0]
    check_order(ctx, pubs, own[2:] + [ctx.id0 + 2], pre_created=len(own))


@case("queue.same-id-replaces", "a second connection with a connected id replaces the first: "
      "the first is closed, the second gets later deliveries")
def same_id(ctx: Ctx) -> None:
    ids, conns = _connected(ctx, 2)
    x, p = ids
    second = ctx.worker(x)
    ctx.expect_closed(conns[0], f"first connection of worker {x}", ctx.hello(x))
    event = ctx.event(p, "after-replace")
    ctx.publish(conns[1], {}, event)
    ctx.expect(second, [event], f"second connection of worker {x}")
