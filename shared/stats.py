"""Statistics as text: the Prometheus exposition format (0.0.4) and JSON.

The structured form is the frozen dataclasses that ``Broker.statistics()`` and
``Client.statistics()`` return; this module only renders them, so it never drifts from
them: every numeric field becomes a metric (known fields get a written help text and type,
a field added later still shows up, as a counter unless it is listed as a gauge).

Names: ``workerbus_broker_*``, ``workerbus_router_*``, ``workerbus_queue_*{worker_id}``,
``workerbus_client_*{worker_id}``, ``workerbus_process_*``. Counters end in ``_total``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from typing import Any

__all__ = [
    "ProcessMemory",
    "broker_metrics",
    "client_metrics",
    "process_memory",
    "statistics_json",
]

#: Fields that go up and down; every other numeric field is a counter.
_GAUGES = frozenset(
    {
        "connections",
        "open_connections",
        "queued",
        "in_flight",
        "depth",
        "connected",
        "buffered",
        "inbox",
        "expected_workers",
        "pid",
        "engine_connected",
    }
)
#: The cluster bridge's fields (workerbus_bridge_*), whose names other sections reuse.
_BRIDGE_HELP = {
    "engine_connected": "1 while the bridge's engine connection is up.",
    "sent": "Cluster events handed to the engine.",
    "received": "Cluster events received from other nodes and delivered here.",
    "lost": "Cluster events of other nodes found missing (numbered gaps), reported as lost.",
    "buffered": "Cluster publishes waiting for the engine.",
    "dropped": "Cluster publishes dropped because the bridge's outbox was full.",
    "reconnects": "Engine connections after the first.",
    "unique_won": "Cluster-unique keys this node claimed and handled.",
    "unique_duplicates": "Cluster-unique publishes whose key another publish had claimed.",
}
_HELP = {
    "connections": "Worker connections past their hello.",
    "open_connections": "Connections open, including those still in their handshake.",
    "accepted": "Connections that completed the hello.",
    "refused": "Connections closed before or at the hello, for any reason.",
    "protocol_errors": "Connections closed for breaking the protocol after the hello.",
    "refused_untrusted": "Connections refused because the peer's uid is not trusted.",
    "refused_over_limit": "Connections refused because max_connections was reached.",
    "handshake_timeouts": "Connections dropped at the handshake deadline.",
    "frame_timeouts": "Connections closed because a frame was not completed within frame_timeout.",
    "accept_failures": "Accepts that failed for want of a file descriptor; the peer waited and was retried.",
    "expected_workers": "Worker ids 0..N-1 whose queues are kept whether or not they are connected.",
    "pid": "Process id of the broker.",
    "publishes": "Publishes routed.",
    "deliveries": "Frames accepted into worker queues.",
    "dropped": "Events lost for a worker (overflow, disconnect policy, expiry).",
    "unique_duplicates": "Unique publishes suppressed as repeats.",
    "unique_evicted": "Unique keys forgotten early because the key table was full.",
    "unroutable": "Publishes with no queue to go to.",
    "routed": "Frames offered to worker queues (= sent + dropped + abandoned + queued + in flight).",
    "abandoned": "Frames left for departed workers whose process ended (nobody left to receive them; not drops).",
    "queues_released": "Queues of departed workers retired at once because their process ended.",
    "sent": "Frames written to worker connections.",
    "queued": "Frames waiting in worker queues.",
    "in_flight": "Frames being written.",
    "overflow_disconnects": "Connections closed by the disconnect overflow policy.",
    "filtered": "Deliveries skipped because the worker's filter does not take the event (not drops).",
    "depth": "Frames waiting in this worker's queue.",
    "enqueued": "Frames accepted into this worker's queue.",
    "published": "Publishes accepted into the client's buffer.",
    "delivered": "Events handed to handlers.",
    "dropped_by_broker": "Events the broker reported it dropped for this worker.",
    "undecodable": "Events skipped because they could not be decoded.",
    "handler_errors": "Handler calls that raised.",
    "connects": "Successful connections to a broker.",
    "reconnects": "Connections after the first.",
    "buffered": "Publishes waiting to be sent.",
    "inbox": "Events waiting for handlers.",
}


@dataclasses.dataclass(frozen=True, slots=True)
class ProcessMemory:
    """Resident memory of a process, from ``/proc/<pid>/status``, in bytes."""

    rss: int  #: VmRSS: resident now
    peak: int  #: VmHWM: the highest resident size so far


def process_memory(pid: int | str = "self") -> ProcessMemory | None:
    """Read VmRSS/VmHWM of ``pid``; None where there is no procfs (or the pid is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    found: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) * 1024  # reported in kB
    if len(found) != 2:
        return None
    return ProcessMemory(rss=found["VmRSS"], peak=found["VmHWM"])


class _Exposition:
    def __init__(self) -> None:
        self._families: dict[str, tuple[str, str, list[str]]] = {}

    def add(
        self, prefix: str, field: str, value: object, labels: str = "", helps: dict[str, str] = _HELP
    ) -> None:
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, (int, float)):
            return
        kind = "gauge" if field in _GAUGES else "counter"
        name = f"{prefix}_{field}" + ("_total" if kind == "counter" else "")
        family = self._families.get(name)
        if family is None:
            family = (kind, helps.get(field, f"The {field} statistic."), [])
            self._families[name] = family
        family[2].append(f"{name}{labels} {value}")

    def add_fields(self, prefix: str, obj: object, labels: str = "", skip: Iterable[str] = ()) -> None:
        skipped = set(skip)
        for f in dataclasses.fields(obj):  # type: ignore[arg-type]
            if f.name not in skipped:
                self.add(prefix, f.name, getattr(obj, f.name), labels)

    def gauge(self, name: str, help_text: str, value: int) -> None:
        self._families[name] = ("gauge", help_text, [f"{name} {value}"])

    def render(self) -> str:
        out: list[str] = []
        for name, (kind, help_text, samples) in self._families.items():
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(samples)
        return "\n".join(out) + "\n"


def _memory(expo: _Exposition, memory: ProcessMemory | None) -> None:
    if memory is not None:
        expo.gauge("workerbus_process_resident_memory_bytes", "Resident memory of this process.", memory.rss)
        expo.gauge(
            "workerbus_process_resident_memory_peak_bytes",
            "Peak resident memory of this process (VmHWM).",
            memory.peak,
        )


def broker_metrics(stats: Any, *, memory: ProcessMemory | None = None) -> str:
    """Render a :class:`shared.broker.BrokerStatistics` (and this process's memory)."""
    expo = _Exposition()
    expo.add_fields("workerbus_broker", stats, skip=("router", "workers", "bridge"))
    router = stats.router
    expo.add_fields("workerbus_router", router, skip=("queues",))
    for queue in router.queues:
        expo.add_fields("workerbus_queue", queue, f'{{worker_id="{queue.worker_id}"}}', skip=("worker_id",))
    bridge = getattr(stats, "bridge", None)
    if bridge is not None:
        labels = f'{{node="{_label(bridge.node)}",engine="{_label(bridge.engine)}"}}'
        for f in dataclasses.fields(bridge):
            expo.add("workerbus_bridge", f.name, getattr(bridge, f.name), labels, _BRIDGE_HELP)
    _memory(expo, memory)
    return expo.render()


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def client_metrics(stats: Any, *, memory: ProcessMemory | None = None) -> str:
    """Render a :class:`shared.client.ClientStatistics` (for an app's own /metrics)."""
    expo = _Exposition()
    expo.add_fields("workerbus_client", stats, f'{{worker_id="{stats.worker_id}"}}', skip=("worker_id",))
    _memory(expo, memory)
    return expo.render()


def statistics_json(stats: Any, *, memory: ProcessMemory | None = None) -> str:
    """Any statistics dataclass as JSON, plus ``process_memory`` when given."""
    doc: dict[str, Any] = dataclasses.asdict(stats)
    if memory is not None:
        doc["process_memory"] = dataclasses.asdict(memory)
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"
