"""examples/ws_chat under real multi-worker servers, driven by real websocket clients.

Both apps (workerbus's own API, and broadcaster's API over WorkerbusBackend) under
``uvicorn --workers 2``, and the workerbus one under hypercorn's trio workers. The same
apps in a real browser: tests/test_ws_chat_browser.py.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack

import pytest
from websockets.sync.client import connect

# (the base class: websockets 16, the last for Python 3.10, types connect() with it)
from websockets.sync.connection import Connection

from tests.browser import chat_server

pytestmark = pytest.mark.slow

WORKERS = 2


@pytest.mark.parametrize(
    ("server", "app"),
    [
        ("uvicorn", "examples.ws_chat.app:app"),
        ("uvicorn", "examples.ws_chat.broadcast_app:app"),
        ("hypercorn-trio", "examples.ws_chat.app:app"),
    ],
)
def test_a_message_reaches_the_clients_of_every_worker(server: str, app: str) -> None:
    with chat_server(WORKERS, app, server) as url, ExitStack() as stack:
        conns: list[Connection] = []
        senders: dict[int, Connection] = {}  # the first client of each worker
        pids: dict[int, int] = {}
        deadline = time.monotonic() + 30
        # Connect until every worker holds a websocket (bounded). Paced: connections made
        # while a worker is still starting all go to the others.
        for _ in range(100):
            if len(pids) == WORKERS or time.monotonic() > deadline:
                break
            ws = stack.enter_context(connect(url.replace("http:", "ws:") + "/ws", open_timeout=10))
            conns.append(ws)
            hello = json.loads(ws.recv(timeout=10))
            assert hello["type"] == "hello", hello
            # one worker id, one process
            assert pids.setdefault(hello["worker"], hello["pid"]) == hello["pid"], (hello, pids)
            senders.setdefault(hello["worker"], ws)
            time.sleep(0.05)
        assert sorted(pids) == list(range(WORKERS)), pids
        assert len(set(pids.values())) == WORKERS

        # From a client of each worker in turn: every client gets it, tagged with that worker.
        for worker, sender in senders.items():
            text = f"from a client of worker {worker}"
            sender.send(text)
            for conn in conns:
                got = json.loads(conn.recv(timeout=10))
                assert got == {"type": "message", "text": text, "worker": worker}


@pytest.mark.parametrize("app", ["examples.ws_chat.app:app", "examples.ws_chat.broadcast_app:app"])
def test_blank_and_oversized_messages_are_refused_to_their_sender(app: str) -> None:
    with chat_server(1, app) as url, connect(url.replace("http:", "ws:") + "/ws", open_timeout=10) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"
        for bad in ("   ", "x" * 2001):
            ws.send(bad)
            assert json.loads(ws.recv(timeout=10)) == {
                "type": "error", "error": "a message has 1 to 2000 characters"}
        ws.send("x" * 2000)
        assert json.loads(ws.recv(timeout=10))["text"] == "x" * 2000
