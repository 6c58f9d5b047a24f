"""Settings of the Django Channels example: a websocket chat whose groups span the workers.

CHANNEL_BACKEND picks the layer: "workerbus" (default; no Redis) or "redis"
(channels_redis, at REDIS_URL), so the benchmark runs the same app on both.
"""

import os
import tempfile

SECRET_KEY = "example-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = ["channels"]
ROOT_URLCONF = "examples.django_chat.urls"
ASGI_APPLICATION = "examples.django_chat.asgi.application"
USE_TZ = True

_default_bus = f"unix:{tempfile.gettempdir()}/workerbus-{os.getuid()}/django-chat.sock"

if os.environ.get("CHANNEL_BACKEND", "workerbus") == "redis":
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [os.environ["REDIS_URL"]]},
        }
    }
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "shared.integrations.channels.WorkerbusChannelLayer",
            "CONFIG": {"address": os.environ.get("WORKERBUS_ADDRESS", _default_bus)},
        }
    }
