"""A Flask (WSGI) app on gunicorn sync workers, sharing events through the embedded bus.

    gunicorn -w 4 examples.wsgi_app:app

Same endpoints and environment variables as examples/asgi_app.py (``POST /publish``,
``GET /seen``, ``WORKERBUS_ADDRESS``, ``WORKERBUS_WORKERS``, ``WORKERBUS_TRANSPORT``).

The bus runs in a background thread (:class:`shared.blocking.BlockingClient`). It is started
lazily in each worker, on the first request, because a thread started before gunicorn
forks (``--preload``) would not exist in the workers. Handlers run in the bus thread, so
the list they fill is guarded by a lock.
"""

from __future__ import annotations

import atexit
import os
import tempfile
import threading
from collections import deque
from typing import Any

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue

from shared.blocking import BlockingClient
from shared.errors import BusError

MAX_SEEN = 1000

app = Flask(__name__)

_lock = threading.Lock()
_seen: deque[dict[str, Any]] = deque(maxlen=MAX_SEEN)
_bus: BlockingClient | None = None
_bus_pid = 0


def bus_address() -> str:
    address = os.environ.get("WORKERBUS_ADDRESS")
    if address:
        return address
    directory = os.path.join(tempfile.gettempdir(), f"workerbus-{os.getuid()}")
    return f"unix:{os.path.join(directory, 'wsgi.sock')}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _record(data: Any, event: str, source: str, wid: int | None) -> None:
    with _lock:
        _seen.append({"source": source, "event": event, "data": _jsonable(data), "wid": wid})


def get_bus() -> BlockingClient:
    """This worker's bus, started on first use (after the fork)."""
    global _bus, _bus_pid
    with _lock:
        if _bus is not None and _bus_pid == os.getpid():
            return _bus
    value = os.environ.get("WORKERBUS_WORKERS", "")
    workers = int(value) if value.isdigit() and int(value) > 0 else None
    bus = BlockingClient(
        bus_address(), workers=workers, transport=os.environ.get("WORKERBUS_TRANSPORT", "http")
    ).start()
    bus.subscribe("*", "*", _record)
    bus.wait_ready(timeout=10)
    with _lock:
        _bus, _bus_pid = bus, os.getpid()
    atexit.register(bus.close)  # gunicorn's graceful worker exit runs atexit
    return bus


@app.post("/publish")
def publish() -> ResponseReturnValue:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return jsonify(error="body must be a JSON object"), 400
    source, event = body.get("source"), body.get("event")
    if not isinstance(source, str) or not isinstance(event, str):
        return jsonify(error="'source' and 'event' must be strings"), 400
    bus = get_bus()
    try:
        bus.publish(source, event, body.get("data"), body.get("target", "all"))
    except (BusError, ValueError) as exc:
        return jsonify(error=str(exc)), 400
    return jsonify(published=True, worker_id=bus.worker_id, pid=os.getpid())


@app.get("/seen")
def seen() -> ResponseReturnValue:
    bus = get_bus()
    source = request.args.get("source")
    with _lock:
        events = [e for e in _seen if source is None or e["source"] == source]
    client = bus.client
    return jsonify(
        worker_id=bus.worker_id,
        pid=os.getpid(),
        broker=bus.is_broker,
        generation=getattr(client, "generation", None),
        lost=getattr(client, "lost", 0),
        events=events,
    )
