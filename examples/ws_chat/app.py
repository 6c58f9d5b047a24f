"""A websocket chat whose tabs may sit on different workers: workerbus carries the messages.

Run it from the repository root and open http://127.0.0.1:8000/ in a few tabs:

    uvicorn examples.ws_chat.app:app --workers 4

Each tab's websocket lands on whichever worker the kernel hands the connection to. A
message typed in a tab is published to the bus by that tab's worker; every worker
receives it and passes it on to its own websockets. The page shows which worker it is on
and which worker each message came through.

Configuration, optional: ``WORKERBUS_ADDRESS`` (the bus socket, default
``unix:<tmp>/workerbus-<uid>/ws_chat.sock``) and ``WORKERBUS_WORKERS`` (ids ``0..N-1``;
otherwise ``WEB_CONCURRENCY`` is a hint and ids are the lowest free ones).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from shared.embed import EmbeddedClient, join

PAGE = Path(__file__).with_name("index.html")
#: Longest message accepted from a browser, in characters.
MAX_TEXT = 2000


def bus_address() -> str:
    address = os.environ.get("WORKERBUS_ADDRESS")
    if address:
        return address
    directory = os.path.join(tempfile.gettempdir(), f"workerbus-{os.getuid()}")
    return f"unix:{os.path.join(directory, 'ws_chat.sock')}"


def workers() -> int | None:
    value = os.environ.get("WORKERBUS_WORKERS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with join(bus_address(), workers=workers()) as bus:
        await bus.wait_ready()  # serve once this worker is on the bus
        app.state.bus = bus
        yield


async def page(request: Request) -> FileResponse:
    return FileResponse(PAGE)


async def chat(websocket: WebSocket) -> None:
    bus: EmbeddedClient = websocket.app.state.bus
    await websocket.accept()
    # Subscribe before saying hello: a message sent once the page shows "worker N" is seen.
    async with bus.events("chat", "message") as events, anyio.create_task_group() as tg:
        await websocket.send_json({"type": "hello", "worker": bus.worker_id, "pid": os.getpid()})

        async def to_browser() -> None:
            try:
                async for ev in events:
                    if isinstance(ev.data, dict):  # anything else is not one of ours
                        text, worker = ev.data.get("text"), ev.data.get("worker")
                        await websocket.send_json(
                            {"type": "message", "text": text, "worker": worker}
                        )
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
                await bus.publish("chat", "message", {"text": text, "worker": bus.worker_id})
        except WebSocketDisconnect:
            pass
        tg.cancel_scope.cancel()


app = Starlette(
    routes=[Route("/", page), WebSocketRoute("/ws", chat)],
    lifespan=lifespan,
)
