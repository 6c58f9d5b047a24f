"""Timestamps along an event's path, for benchmarks/storm_delays.py (not imported otherwise).

Python imports a ``sitecustomize`` module from ``PYTHONPATH`` at start-up; storm_delays.py
puts this directory there for the processes of one seed-experiment window, with
``WB_STORM_TRACE`` naming a directory. Each process then wraps, without changing the
library, three places of the event path and writes ``trace-<pid>.json`` when it ends:

- the broker's read (``shared.broker.decode_publish_batch``): when, how many frames, and
  the post times of the first and last event in it;
- each decode chunk of a client (``Client._decoded``): when, how many, first/last post time;
- each handler call (a wrapper around every ``Client.subscribe`` handler): post time, now;
- (for ``--hops``) each routing of a read (``Router.route_runs``, with the publisher's id), each
  write to a worker (``Broker._take``), and the receiving worker's id on chunks and handler calls.
"""

from __future__ import annotations

import os

if os.environ.get("WB_STORM_TRACE"):
    import atexit
    import json
    import signal
    import time
    from typing import Any

    import msgpack

    import shared.broker as _broker
    import shared.client as _client

    _now = time.monotonic_ns
    _out = os.environ["WB_STORM_TRACE"]
    _rec: dict[str, list[tuple[int, ...]]] = {
        "broker_reads": [],
        "client_chunks": [],
        "handled": [],
    }

    def _dump() -> None:
        with open(os.path.join(_out, f"trace-{os.getpid()}.json"), "w") as f:
            json.dump(_rec, f)

    def _on_term(*_: Any) -> None:
        # uvicorn re-raises SIGTERM after its graceful shutdown, which skips atexit
        _dump()
        os._exit(0)

    atexit.register(_dump)
    signal.signal(signal.SIGTERM, _on_term)

    _decode_publish_batch = getattr(_broker, "decode_publish_batch")  # noqa: B009

    def _traced_decode_publish_batch(profile: Any, payloads: list[bytes], keys: Any = None) -> Any:
        runs, error = _decode_publish_batch(profile, payloads, keys)
        t = _now()
        if runs:
            h = profile.header_len
            first, last = msgpack.unpackb(runs[0][1][0][h:]), msgpack.unpackb(runs[-1][1][-1][h:])
            if isinstance(first, dict) and first.get("event") == "tick":
                _rec["broker_reads"].append(
                    (t, len(payloads), first["data"]["ts"], last["data"]["ts"])
                )
        return runs, error

    setattr(_broker, "decode_publish_batch", _traced_decode_publish_batch)  # noqa: B010

    _decoded = _client.Client._decoded

    _subscribe = _client.Client.subscribe

    # --- per hop, by publisher (storm_delays.py --hops) ---------------------------------
    # The router's routing of one read (who published it: the connection's worker id) and
    # each write the broker makes to a worker (to which, what it holds), so that the delay
    # can be split per hop for the host's own events and the other workers'.
    import shared.router as _router

    _rec["routed"] = []
    _rec["writes"] = []
    _rec["me"] = []

    def _tick_ts(obj: Any) -> int | None:
        # the "ts" of a tick event somewhere in a decoded publish or delivery
        if isinstance(obj, dict):
            data = obj.get("data")
            if isinstance(data, dict) and "ts" in data:
                return int(data["ts"])
            for v in obj.values():
                found = _tick_ts(v)
                if found is not None:
                    return found
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                found = _tick_ts(v)
                if found is not None:
                    return found
        return None

    def _ts_of(frame: bytes, h: int) -> int | None:
        for cut in (h, 0, *range(1, 9)):
            try:
                return _tick_ts(msgpack.unpackb(frame[cut:]))
            except Exception:  # noqa: BLE001 - not this framing; try the other
                continue
        return None

    _route_runs = _router.Router.route_runs

    def _traced_route_runs(self: Any, publisher: Any, runs: Any, keys: Any = None) -> Any:
        t0 = _now()
        n = _route_runs(self, publisher, runs, keys)
        if runs:
            first = _ts_of(runs[0][1][0], 0)
            last = _ts_of(runs[-1][1][-1], 0)
            if first is not None and last is not None:
                _rec["routed"].append((t0, _now(), publisher, sum(len(r) for _, r in runs), first, last))
        return n

    _router.Router.route_runs = _traced_route_runs  # type: ignore[method-assign]

    _take = _broker.Broker._take

    def _traced_take(self: Any, conn: Any) -> Any:
        data, events, reported = _take(self, conn)
        if events:
            h = self.profile.header_len
            first, last = _ts_of(events[0], h), _ts_of(events[-1], h)
            if first is not None and last is not None:
                _rec["writes"].append((_now(), conn.worker_id, len(events), first, last))
        return data, events, reported

    _broker.Broker._take = _traced_take  # type: ignore[method-assign]

    def _traced_decoded(self: Any, payloads: list[bytes]) -> Any:
        t = _now()
        batch = _decoded(self, payloads)
        ticks = [(fields[2]["ts"], fields[3]) for fields in batch if fields[1] == "tick"]
        if ticks:
            _rec["client_chunks"].append(
                (t, len(payloads), ticks[0][0], ticks[-1][0], self.worker_id, ticks[0][1], ticks[-1][1])
            )
        return batch

    _client.Client._decoded = _traced_decoded  # type: ignore[method-assign]

    def _traced_subscribe(self: Any, source: str, event: str, handler: Any) -> str:
        me = self.worker_id
        _rec["me"].append((me,))

        def traced(data: Any, ev: str, src: str, wid: Any) -> Any:
            if ev == "tick":
                _rec["handled"].append((data["ts"], _now(), me, wid))
            return handler(data, ev, src, wid)

        return _subscribe(self, source, event, traced)

    _client.Client.subscribe = _traced_subscribe  # type: ignore[method-assign]
