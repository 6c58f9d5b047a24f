"""One websocket consumer: joins the "chat" group and says which worker it runs in.

Client -> server (JSON): {"op": "group", "body": ...} sends to the whole group;
{"op": "send", "to": CHANNEL, "body": ...} sends to one consumer's channel.
Server -> client: {"hello": {"pid", "worker", "channel"}} first, then
{"body", "via", "worker"} for every message ("via" is "group" or "send").
"""

import json
import os
from typing import Any

from channels.consumer import get_handler_name
from channels.generic.websocket import AsyncWebsocketConsumer

GROUP = "chat"


class ChatConsumer(AsyncWebsocketConsumer):  # type: ignore[misc]
    async def connect(self) -> None:
        await self.channel_layer.group_add(GROUP, self.channel_name)
        await self.accept()
        hello = {"pid": os.getpid(), "worker": self._worker(),
                 "channel": self.channel_name}
        await self.send(text_data=json.dumps({"hello": hello}))

    def _worker(self) -> int | None:
        # The workerbus layer knows its bus worker id; channels_redis has none (pid tells).
        return getattr(self.channel_layer, "worker_id", None)

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(GROUP, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        msg = json.loads(text_data or "{}")
        event = {"type": "chat.message", "body": msg.get("body"), "via": msg.get("op")}
        if msg.get("op") == "group":
            await self.channel_layer.group_send(GROUP, event)
        elif msg.get("op") == "send":
            await self.channel_layer.send(msg["to"], event)

    async def chat_message(self, event: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(
            {"body": event["body"], "via": event["via"], "worker": self._worker()}
        ))


class NoDbChatConsumer(ChatConsumer):
    """The same consumer for apps that use no database (``CHAT_CONSUMER=nodb``).

    Before every handler, channels closes stale database connections through
    ``sync_to_async``: a thread-pool round trip per message, which dominates a worker's
    profile when messages are small. A consumer that never touches the database can skip
    it; benchmarks/channels_layer.py measures both.
    """

    async def dispatch(self, message: dict[str, Any]) -> None:
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"no handler for message type {message['type']}")
        await handler(message)
