"""``uvicorn examples.django_chat.asgi:application --workers 4 --lifespan off``"""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_chat.settings")

from django.core.asgi import get_asgi_application

django_http = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402

from .consumers import ChatConsumer, NoDbChatConsumer  # noqa: E402

# CHAT_CONSUMER=nodb: the consumer that skips channels' per-message database clean-up.
consumer = NoDbChatConsumer if os.environ.get("CHAT_CONSUMER") == "nodb" else ChatConsumer

application = ProtocolTypeRouter(
    {
        "http": django_http,
        "websocket": URLRouter([path("ws/chat/", consumer.as_asgi())]),
    }
)
