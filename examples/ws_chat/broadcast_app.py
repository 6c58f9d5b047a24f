"""The same chat on the ``broadcaster`` package's API, with workerbus as its backend.

Starlette's docs build websocket chat on ``broadcaster``; with
:class:`shared.integrations.broadcaster.WorkerbusBackend` such an app keeps its code and
needs no Redis to span ``--workers``:

    uvicorn examples.ws_chat.broadcast_app:app --workers 4

Same page, same configuration (``WORKERBUS_ADDRESS``, ``WORKERBUS_WORKERS``) as app.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from broadcaster import Broadcast
from starlette.applications import Starlette
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from examples.ws_chat.app import MAX_TEXT, bus_address, page, workers
from shared.integrations.broadcaster import WorkerbusBackend

backend = WorkerbusBackend(bus_address(), workers=workers())
broadcast = Broadcast(backend=backend)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with broadcast:
        yield


async def chat(websocket: WebSocket) -> None:
    worker = backend.bus.worker_id
    await websocket.accept()
    async with broadcast.subscribe("chat") as subscriber, anyio.create_task_group() as tg:
        await websocket.send_json({"type": "hello", "worker": worker, "pid": os.getpid()})

        async def to_browser() -> None:
            try:
                async for event in subscriber:
                    if event is not None:
                        await websocket.send_text(event.message)
            except WebSocketDisconnect:
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(to_browser)
        try:
            while True:
                text = await websocket.receive_text()
                if not text.strip() or len(text) > MAX_TEXT:
                    await websocket.send_json(
                        {"type": "error", "error": f"a message has 1 to {MAX_TEXT} characters"}
                    )
                    continue
                message = {"type": "message", "text": text, "worker": worker}
                await broadcast.publish("chat", json.dumps(message))
        except WebSocketDisconnect:
            pass
        tg.cancel_scope.cancel()


app = Starlette(
    routes=[Route("/", page), WebSocketRoute("/ws", chat)],
    lifespan=lifespan,
)
