"""A publisher process for the burst tests: ``python -m tests.burst ADDRESS --id N --count K``.

Publishes ``count`` events ``("burst", "e", i)`` as fast as the client takes them, waits
until they are written, prints the number published on stdout and exits.
"""

from __future__ import annotations

import argparse

import anyio

from shared.client import Client
from shared.transportnames import load_transport


async def _publish(args: argparse.Namespace) -> None:
    async with Client(args.address, transport=load_transport(args.transport), worker_id=args.id) as bus:
        with anyio.fail_after(args.timeout):
            await bus.wait_ready()
            pad = "x" * args.pad
            for i in range(args.count):
                await bus.publish("burst", "e", [i, pad] if pad else i, args.target)
            await bus.flush()
    print(bus.statistics().sent, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(prog="burst")
    p.add_argument("address")
    p.add_argument("--id", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--target", default="others")
    p.add_argument("--transport", default="http")
    p.add_argument("--pad", type=int, default=0, help="bytes of padding per event")
    p.add_argument("--timeout", type=float, default=60.0)
    anyio.run(_publish, p.parse_args())


if __name__ == "__main__":
    main()
