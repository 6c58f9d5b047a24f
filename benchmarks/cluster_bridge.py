"""Cluster fan-out through the bridge: events/s from one node's publisher to another
node's worker, per engine and per broker backend (docs/cluster.md, "Measured").

    python -m benchmarks.cluster_bridge [--events 20000] [--engines nats redis]
                                        [--backends asyncio trio]

Real processes: the engine server, two brokers with ``--bridge``, one worker process on
each node (tests/cluster_kit.py). The time is from the publish command to the moment the
receiving worker has every event; the publisher publishes as fast as its client lets it.
"""

from __future__ import annotations

import argparse
import time

from tests.cluster_kit import cluster_dir, engine, nodes


def run(kind: str, backend: str, events: int) -> tuple[float, int]:
    with cluster_dir() as workdir, engine(kind, workdir) as eng, nodes(workdir, [eng.url] * 2, backend) as ns:
        sender = ns[0].start_workers(1)[0]
        receiver = ns[1].start_workers(1)[0]
        sender.publish("warm", 100, scope="cluster")
        receiver.lines.wait(lambda items: sum(1 for i in items if i.get("event") == "warm" and "source" in i) >= 100)
        start = time.perf_counter()
        sender.command(op="publish", event="m", n=events, scope="cluster")
        receiver.lines.wait(
            lambda items: sum(1 for i in items if i.get("event") == "m" and "source" in i)
            + sum(i["data"]["count"] for i in items if i.get("event") == "lost") >= events,
            timeout=300,
        )
        elapsed = time.perf_counter() - start
        return events / elapsed, ns[1].bridge()["lost"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--engines", nargs="+", default=["nats", "redis"])
    parser.add_argument("--backends", nargs="+", default=["asyncio", "trio"])
    args = parser.parse_args()
    for kind in args.engines:
        for backend in args.backends:
            rate, lost = run(kind, backend, args.events)
            print(f"{kind:5} broker on {backend:7}: {rate:9.0f} events/s node to node ({lost} lost)", flush=True)


if __name__ == "__main__":
    main()
