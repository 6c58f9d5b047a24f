"""Cluster bridge engines (docs/cluster.md): pick one by URL.

``nats://HOST:PORT`` (``pip install workerbus[nats]``), ``redis://HOST:PORT[/DB]`` or
``redis+unix:///path/redis.sock`` (``pip install workerbus[redis]``).
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit, urlunsplit

from shared.bridge import DEFAULT_CLUSTER, DEFAULT_MAX_BUFFER, Bridge, Engine

__all__ = ["make_bridge"]

_SCHEMES = ("nats", "redis", "redis+unix")


def _public(url: str) -> str:
    # Logs and statistics show the URL without a password.
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


#: The engines' default ports, for the error message of a URL without a host.
_PORTS = {"nats": 4222, "redis": 6379}


def make_bridge(
    url: str,
    *,
    node: str | None = None,
    cluster: str = DEFAULT_CLUSTER,
    max_buffer: int = DEFAULT_MAX_BUFFER,
) -> Bridge:
    """A :class:`Bridge` to the engine at ``url``.

    Raises:
        ValueError: an unknown scheme, a bad URL or name.
        ImportError: the engine's client library is not installed (names the extra).
    """
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme not in _SCHEMES:
        raise ValueError(f"bridge URL {url!r}: expected nats://, redis:// or redis+unix://")
    # (the engines' clients would otherwise retry an address that can never work, forever)
    if scheme == "redis+unix" and not parts.path:
        raise ValueError(f"bridge URL {url!r}: no socket path (redis+unix:///path/to/redis.sock)")
    if scheme != "redis+unix" and not parts.hostname:
        raise ValueError(f"bridge URL {url!r}: no host (e.g. {scheme}://127.0.0.1:{_PORTS[scheme]})")
    if not cluster or not all(c.isalnum() or c in "-_" for c in cluster):
        raise ValueError(f"cluster name {cluster!r}: use letters, digits, - and _")
    node = node or socket.gethostname()
    factory: object
    if scheme == "nats":
        try:
            from .nats import NatsEngine
        except ImportError as exc:
            raise ImportError(f"the nats bridge needs nats-py: pip install 'workerbus[nats]' ({exc})") from None

        def factory() -> Engine:
            return NatsEngine(url, cluster)
    else:
        try:
            from .redis import RedisEngine
        except ImportError as exc:
            raise ImportError(f"the redis bridge needs redis-py: pip install 'workerbus[redis]' ({exc})") from None

        def factory() -> Engine:
            return RedisEngine(url, cluster)

    return Bridge(factory, node=node, description=_public(url), max_buffer=max_buffer)
