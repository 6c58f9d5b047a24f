"""Timestamps along the latency test's event path, for benchmarks/lat_stages.py.

Python imports ``sitecustomize`` from ``PYTHONPATH`` at start-up; lat_stages.py puts this
directory there, with ``WB_LAT_TRACE`` naming a directory, for one ``workerbus bench
--tests lat`` run. Each process then wraps, without changing the library:

- every ``FrameStream.send`` (client writers and broker writers) and every
  ``FrameStream.receive`` (broker readers and client readers): when, and the publish times
  of the first and last ``tick`` in those frames (found by decoding them here);
- every workerbus handler call of the bench's subscribers (``Tally.handler``).

Records go to ``trace-<pid>.jsonl`` (the bench's workers end with ``os._exit``, which is
wrapped so that nothing is lost).
"""

from __future__ import annotations

import os

if os.environ.get("WB_LAT_TRACE"):
    import atexit
    import json
    import time
    from typing import Any

    import msgpack

    import shared.stream as _stream

    _now = time.monotonic_ns
    _out = os.environ["WB_LAT_TRACE"]
    _rec: list[tuple[Any, ...]] = []

    def _dump() -> None:
        if not _rec:
            return
        with open(os.path.join(_out, f"trace-{os.getpid()}.jsonl"), "a") as f:
            for r in _rec:
                f.write(json.dumps(r) + "\n")
        _rec.clear()

    atexit.register(_dump)
    _real_exit = os._exit

    def _exit(code: int) -> Any:
        _dump()
        _real_exit(code)

    setattr(os, "_exit", _exit)  # noqa: B010 - the bench workers end with os._exit

    def _ticks(payloads: list[bytes] | list[memoryview]) -> tuple[str, list[int]]:
        kind = "ev"
        out: list[int] = []
        for p in payloads:
            try:
                m = msgpack.unpackb(p)
            except Exception:  # noqa: BLE001 - a control frame or anything else: skipped
                continue
            if isinstance(m, dict) and "spec" in m and isinstance(m.get("data"), bytes):
                kind = "env"
                try:
                    m = msgpack.unpackb(m["data"])
                except Exception:  # noqa: BLE001
                    continue
            if isinstance(m, dict) and m.get("event") == "tick":
                data = m.get("data")
                if isinstance(data, dict) and "ts" in data:
                    out.append(data["ts"])
        return kind, out

    def _split(data: bytes) -> list[memoryview]:
        view = memoryview(data)
        out = []
        pos = 0
        while pos + 2 <= len(data):
            n = (data[pos] << 8) | data[pos + 1]
            out.append(view[pos + 2 : pos + 2 + n])
            pos += 2 + n
        return out

    def _note(what: str, t: int, payloads: Any) -> None:
        kind, ts = _ticks(payloads)
        if ts:
            _rec.append((what, kind, t, ts[0], ts[-1], len(ts)))
            if len(_rec) >= 512:
                _dump()

    _send = _stream.FrameStream.send
    _receive = _stream.FrameStream.receive

    async def _traced_send(self: Any, data: bytes) -> None:
        # (the time the writer hands the bytes to the socket: GuardedStream.send writes
        # before its first schedule point)
        t = _now()
        await _send(self, data)
        _note("send", t, _split(data))

    async def _traced_receive(self: Any) -> list[bytes]:
        frames = await _receive(self)
        _note("recv", _now(), frames)
        return frames

    _stream.FrameStream.send = _traced_send  # type: ignore[method-assign]
    _send_nowait = getattr(_stream.FrameStream, "send_nowait", None)
    if _send_nowait is not None:  # (a tree with direct writes)

        real_send_nowait: Any = _send_nowait

        def _traced_send_nowait(self: Any, data: bytes) -> int:
            t = _now()
            written: int = real_send_nowait(self, data)
            _note("send", t, _split(data[:written]))
            return written

        _stream.FrameStream.send_nowait = _traced_send_nowait  # type: ignore[method-assign]
    _stream.FrameStream.receive = _traced_receive  # type: ignore[method-assign]

    from shared.tools.bench import tally as _tally

    _handler = _tally.Tally.handler

    def _traced_handler(self: Any, data: Any, event: str, source: str, wid: Any) -> None:
        if event == "tick":
            _rec.append(("handled", "ev", _now(), data["ts"], data["ts"], 1))
            if len(_rec) >= 512:
                _dump()
        _handler(self, data, event, source, wid)

    _tally.Tally.handler = _traced_handler  # type: ignore[method-assign]
