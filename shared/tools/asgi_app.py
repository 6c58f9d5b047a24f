"""An ASGI app whose workers share events through the embedded bus (docs/embedding.md).

It ships with the tools, so that ``workerbus demo --asgi`` runs from an install;
``examples.asgi_app`` is the same app under the name the docs use. Run it under any
multi-worker ASGI server (from the repository root for the ``examples.`` name):

    uvicorn examples.asgi_app:app --workers 4
    gunicorn -k uvicorn.workers.UvicornWorker -w 4 examples.asgi_app:app
    hypercorn --workers 4 examples.asgi_app:app                  # asyncio
    hypercorn --workers 4 --worker-class trio examples.asgi_app:app

Endpoints:

- ``POST /publish`` with JSON ``{"source", "event", "data", "target", "scope"}``
  (``target``: ``all`` by default, or ``others``, ``worker:N``, ``unique:KEY``, ``current``;
  ``scope``: ``local`` by default, or ``cluster`` to reach every host, docs/cluster.md);
- ``GET /seen`` → ``{"worker_id", "pid", "broker", "generation", "lost", "events"}``;
  ``events`` lists what this worker received, ``{"source", "event", "data", "wid", "node"}``
  (``node``: the host it came from, null for this one), newest last; ``?source=NAME`` keeps
  one source only.

Configuration, all optional, from the environment:

- ``WORKERBUS_ADDRESS``: the bus socket, default ``unix:<tmp>/workerbus-<uid>/asgi.sock``;
- ``WORKERBUS_WORKERS``: the number of workers (ids ``0..N-1``); otherwise the
  ``WEB_CONCURRENCY`` hint is used, and ids are the lowest free ones;
- ``WORKERBUS_TRANSPORT``: ``http`` (default) or ``stream``;
- ``WORKERBUS_BRIDGE``, ``WORKERBUS_NODE``, ``WORKERBUS_CLUSTER``: join a cluster of hosts
  (read by ``join``; docs/cluster.md).
"""

from __future__ import annotations

import os
import tempfile
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from shared.embed import EmbeddedClient, join
from shared.errors import BusError

#: Events remembered per worker for /seen.
MAX_SEEN = 1000


def bus_address() -> str:
    address = os.environ.get("WORKERBUS_ADDRESS")
    if address:
        return address
    directory = os.path.join(tempfile.gettempdir(), f"workerbus-{os.getuid()}")
    return f"unix:{os.path.join(directory, 'asgi.sock')}"


def _workers() -> int | None:
    value = os.environ.get("WORKERBUS_WORKERS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    seen: deque[dict[str, Any]] = deque(maxlen=MAX_SEEN)

    def record(data: Any, event: str, source: str, wid: int | None) -> None:
        seen.append(
            {"source": source, "event": event, "data": _jsonable(data), "wid": wid,
             "node": getattr(wid, "node", None)}
        )

    transport = os.environ.get("WORKERBUS_TRANSPORT", "http")
    async with join(bus_address(), workers=_workers(), transport=transport) as bus:
        bus.subscribe("*", "*", record)
        app.state.bus = bus
        app.state.seen = seen
        yield


def _bad(message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=400)


async def publish(request: Request) -> JSONResponse:
    bus: EmbeddedClient = request.app.state.bus
    try:
        body = await request.json()
    except ValueError:
        return _bad("body must be JSON")
    if not isinstance(body, dict):
        return _bad("body must be a JSON object")
    source, event = body.get("source"), body.get("event")
    if not isinstance(source, str) or not isinstance(event, str):
        return _bad("'source' and 'event' must be strings")
    target = body.get("target", "all")
    if not isinstance(target, (str, int)) or isinstance(target, bool):
        return _bad("'target' must be a string or a worker id")
    scope = body.get("scope", "local")
    if not isinstance(scope, str):
        return _bad("'scope' must be local or cluster")
    try:
        await bus.publish(source, event, body.get("data"), target, scope=scope)
    except (BusError, ValueError) as exc:
        return _bad(str(exc))
    return JSONResponse({"published": True, "worker_id": bus.worker_id, "pid": os.getpid()})


async def seen(request: Request) -> JSONResponse:
    bus: EmbeddedClient = request.app.state.bus
    source = request.query_params.get("source")
    events = [e for e in request.app.state.seen if source is None or e["source"] == source]
    return JSONResponse(
        {
            "worker_id": bus.worker_id,
            "pid": os.getpid(),
            "broker": bus.is_broker,
            "generation": bus.generation,
            "lost": bus.lost,
            "events": events,
        }
    )


app = Starlette(
    routes=[Route("/publish", publish, methods=["POST"]), Route("/seen", seen, methods=["GET"])],
    lifespan=lifespan,
)
