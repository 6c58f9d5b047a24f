"""Real Django + channels under ``uvicorn --workers 4`` with the workerbus channel layer.

Real websocket clients (the ``websockets`` package) connect over uvicorn's one shared
accept socket, so the kernel spreads them over the workers; each consumer says which bus
worker it runs in. A group message must reach every client exactly once, and a ``send`` to
one consumer's channel must reach that consumer, on whichever worker it lives.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import unix_connect

# (the base class: websockets 16, the last for Python 3.10, types connect() with it)
from websockets.sync.connection import Connection

from tests.servers import ROOT, Server, running
from tests.test_integration_asgi import _tool

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

WORKERS = 4
#: Clients to connect before giving up on seeing two workers (the kernel decides).
MAX_CLIENTS = 40


class Chat:
    def __init__(self, ws: Connection) -> None:
        self.ws = ws
        hello = self.next()["hello"]
        self.worker: int = hello["worker"]
        self.pid: int = hello["pid"]
        self.channel: str = hello["channel"]

    def next(self, timeout: float = 10.0) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.ws.recv(timeout=timeout))
        return result

    def say(self, **msg: Any) -> None:
        self.ws.send(json.dumps(msg))

    def quiet(self, window: float = 0.5) -> None:
        try:
            extra = self.ws.recv(timeout=window)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected extra message: {extra!r}")


def wait_listening(server: Server, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while not server._listening():
        if server.proc.poll() is not None or time.monotonic() > end:
            raise AssertionError(f"uvicorn did not start:\n{server.log()}")
        time.sleep(0.05)


@contextmanager
def django_chat() -> Iterator[tuple[Server, str]]:
    def argv(uds: str) -> list[str]:
        return [_tool("uvicorn"), "examples.django_chat.asgi:application", "--workers",
                str(WORKERS), "--uds", uds, "--lifespan", "off", "--log-level", "warning"]

    with running(argv, {"CHANNEL_BACKEND": "workerbus"}) as (server, address):
        wait_listening(server)
        yield server, address


def connect_spread(server: Server, stack: ExitStack, want_workers: int = 2) -> list[Chat]:
    chats: list[Chat] = []
    for _ in range(MAX_CLIENTS):
        ws = stack.enter_context(unix_connect(server.uds, "ws://localhost/ws/chat/"))
        chats.append(Chat(ws))
        if len(chats) >= 8 and len({c.worker for c in chats}) >= want_workers:
            break
    return chats


def test_group_and_channel_messages_cross_uvicorn_workers() -> None:
    with django_chat() as (server, _), ExitStack() as stack:
        chats = connect_spread(server, stack)
        workers = {c.worker for c in chats}
        assert len(workers) >= 2, f"all {len(chats)} clients landed on worker(s) {workers}"
        assert len({c.pid for c in chats}) == len(workers)
        print(f"{len(chats)} clients on workers {sorted(workers)}")

        # Every client gets each group message exactly once, from every sender's worker.
        senders = {c.worker: c for c in chats}.values()
        for n, sender in enumerate(senders):
            sender.say(op="group", body=f"g{n}")
            for c in chats:
                got = c.next()
                assert got == {"body": f"g{n}", "via": "group", "worker": c.worker}
        for c in chats:
            c.quiet()

        # A send to one consumer's channel reaches that consumer only, across workers.
        crossed = 0
        for i, target in enumerate(chats):
            sender = chats[(i + 1) % len(chats)]
            crossed += sender.worker != target.worker
            sender.say(op="send", to=target.channel, body=f"to-{i}")
            assert target.next() == {"body": f"to-{i}", "via": "send", "worker": target.worker}
        assert crossed > 0
        for c in chats:
            c.quiet(0.2)


def test_a_client_that_leaves_stops_receiving_and_the_others_go_on() -> None:
    with django_chat() as (server, _), ExitStack() as stack:
        chats = connect_spread(server, stack)
        leaving = chats.pop()
        leaving.ws.close()
        with pytest.raises(ConnectionClosed):
            leaving.ws.recv(timeout=1)
        chats[0].say(op="group", body="after")
        for c in chats:
            assert c.next()["body"] == "after"


def test_a_sync_view_and_another_process_reach_every_client() -> None:
    with django_chat() as (server, address), ExitStack() as stack:
        chats = connect_spread(server, stack)
        # A plain Django view: async_to_sync runs group_send in the worker's own loop.
        r = server.http.get("/broadcast", params={"body": "from-view"})
        assert r.status_code == 200, r.text
        for c in chats:
            assert c.next() == {"body": "from-view", "via": "view", "worker": c.worker}
        # A separate process (a management command, a task queue worker): a fresh event
        # loop per async_to_sync call, so the layer sends over a one-shot connection.
        script = (
            "import django; django.setup()\n"
            "from asgiref.sync import async_to_sync\n"
            "from channels.layers import get_channel_layer\n"
            "layer = get_channel_layer()\n"
            "async_to_sync(layer.group_send)('chat', "
            "{'type': 'chat.message', 'body': 'from-script', 'via': 'script'})\n"
            "print(layer.statistics().one_shot)\n"
        )
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "examples.django_chat.settings",
               "WORKERBUS_ADDRESS": address}
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "1"
        for c in chats:
            assert c.next() == {"body": "from-script", "via": "script", "worker": c.worker}
            c.quiet(0.2)


def test_killing_the_worker_that_hosts_the_broker() -> None:
    with django_chat() as (server, address), ExitStack() as stack:
        chats = connect_spread(server, stack, want_workers=3)
        lock = address.removeprefix("unix:") + ".lock"
        with open(lock) as f:
            host_pid = json.load(f)["pid"]
        survivors = [c for c in chats if c.pid != host_pid]
        doomed = [c for c in chats if c.pid == host_pid]
        assert survivors, "every client landed on the broker's host"
        os.kill(host_pid, signal.SIGKILL)
        for c in doomed:
            with pytest.raises(ConnectionClosed):
                c.next()
        # The survivors elect a new broker; a group message reaches each of them once.
        survivors[0].say(op="group", body="after-kill")
        for c in survivors:
            assert c.next(timeout=15) == {"body": "after-kill", "via": "group", "worker": c.worker}
        # uvicorn restarts the killed worker; a client that lands there joins the group.
        # It needs a moment to start (Django included): connect, look, hang up, retry.
        fresh: Chat | None = None
        known = {s.pid for s in chats}
        end = time.monotonic() + 30
        while fresh is None and time.monotonic() < end:
            attempt = ExitStack()
            c = Chat(attempt.enter_context(unix_connect(server.uds, "ws://localhost/ws/chat/")))
            if c.pid not in known:
                fresh = c
                stack.push(attempt.pop_all())
                survivors.append(c)
            else:
                attempt.close()
                time.sleep(0.1)
        assert fresh is not None, f"no client reached a restarted worker:\n{server.log()}"
        fresh.say(op="group", body="welcome-back")
        for c in survivors:
            assert c.next(timeout=15) == {"body": "welcome-back", "via": "group", "worker": c.worker}
        for c in survivors:
            c.quiet(0.2)
