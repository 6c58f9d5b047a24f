"""The scenarios of ``workerbus bench``: workerbus in each configuration, and its peers.

Each name maps to a factory so that importing the registry imports no optional package
(pyzmq, redis); a peer whose package or program is missing says so through
:meth:`Peer.unavailable` and is skipped with that reason.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import Peer

__all__ = ["BASELINES", "CLUSTER", "PEERS", "WORKERBUS", "make_peer"]


def _workerbus(transport: str, backend: str) -> Callable[[], Peer]:
    def make() -> Peer:
        from .workerbus import WorkerbusPeer

        return WorkerbusPeer(transport, backend)

    return make


def _raw(backend: str) -> Callable[[], Peer]:
    def make() -> Peer:
        from .rawuds import RawUdsPeer

        return RawUdsPeer(backend)

    return make


def _zmq() -> Peer:
    from .zmqproxy import ZmqProxyPeer

    return ZmqProxyPeer()


def _redis() -> Peer:
    from .redispubsub import RedisPeer

    return RedisPeer()


def _mpqueue() -> Peer:
    from .mpqueue import MpQueuePeer

    return MpQueuePeer()


def _shm() -> Peer:
    from .shmring import ShmRingPeer

    return ShmRingPeer(0.010)


WORKERBUS: dict[str, Callable[[], Peer]] = {
    f"workerbus-{transport}-{backend}": _workerbus(transport, backend)
    for transport in ("stream", "http")
    for backend in ("asyncio", "uvloop", "trio")
}

BASELINES: dict[str, Callable[[], Peer]] = {
    "limit-raw-uds": _raw("asyncio"),
    "limit-raw-uds-uvloop": _raw("uvloop"),
    "pyzmq-proxy": _zmq,
    "redis-pubsub": _redis,
    "mp-queue": _mpqueue,
    "shm-poll-10ms": _shm,
}

def _cluster(kind: str, engine: str, backend: str = "asyncio") -> Callable[[], Peer]:
    def make() -> Peer:
        from .cluster import ClusterBridgePeer, ClusterDirectPeer

        return ClusterDirectPeer(engine) if kind == "direct" else ClusterBridgePeer(engine, backend)

    return make


#: Cross-node fan-out: the cluster bridge and its engine used directly (docs/cluster.md).
CLUSTER: dict[str, Callable[[], Peer]] = {
    "cluster-nats-direct": _cluster("direct", "nats"),
    "cluster-nats-bridge": _cluster("bridge", "nats"),
    "cluster-nats-bridge-trio": _cluster("bridge", "nats", "trio"),
    "cluster-redis-direct": _cluster("direct", "redis"),
    "cluster-redis-bridge": _cluster("bridge", "redis"),
}

#: Every scenario, in report order.
PEERS: dict[str, Callable[[], Peer]] = {**WORKERBUS, **BASELINES, **CLUSTER}


def make_peer(name: str) -> Peer:
    """Build the peer called ``name``.

    Raises:
        KeyError: no such scenario.
    """
    return PEERS[name]()
