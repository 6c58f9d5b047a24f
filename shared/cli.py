"""The ``workerbus`` command: broker, publish, tail, demo, conformance, bench.

Each subcommand is a thin shell over the library; long-running ones stop cleanly on
SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio

from .broker import (
    DEFAULT_FRAME_TIMEOUT,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    Broker,
)
from .client import Client
from .errors import AddressInUse, BusError
from .peercred import default_trusted_uids
from .router import (
    DEFAULT_BROADCAST_GRACE,
    DEFAULT_MAX_DEPARTED_QUEUES,
    DEFAULT_MAX_QUEUE_LEN,
    DEFAULT_QUEUE_GRACE,
    DEFAULT_UNIQUE_TIMEOUT,
    OverflowPolicy,
)

__all__ = ["build_parser", "main"]

logger = logging.getLogger("workerbus")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--transport", choices=("http", "stream"), default="http")
    p.add_argument("--profile", choices=("native", "kong"), default="native")
    p.add_argument(
        "--backend",
        choices=("asyncio", "uvloop", "trio"),
        default="asyncio",
        help="event loop: asyncio (default), uvloop (asyncio on uvloop, if installed) or trio",
    )
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workerbus", description="An event bus between worker processes.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("broker", help="run a broker in the foreground")
    p.add_argument("--listen", required=True, metavar="unix:PATH")
    p.add_argument("--workers", type=int, default=0, metavar="N", help="pre-create queues for ids 0..N-1")
    p.add_argument("--unique-timeout", type=float, default=DEFAULT_UNIQUE_TIMEOUT, metavar="SECONDS")
    p.add_argument("--max-queue-len", type=int, default=DEFAULT_MAX_QUEUE_LEN, metavar="N")
    p.add_argument("--max-payload-len", type=int, default=None, metavar="N",
                   help="largest frame payload accepted (default: the profile's maximum)")
    p.add_argument("--queue-grace", type=float, default=DEFAULT_QUEUE_GRACE, metavar="SECONDS")
    p.add_argument("--broadcast-grace", type=float, default=DEFAULT_BROADCAST_GRACE, metavar="SECONDS",
                   help="seconds the queue of a departed id not in 0..N-1 keeps taking broadcasts; "
                        f"later ones are counted as missed (default {DEFAULT_BROADCAST_GRACE:g})")
    p.add_argument("--max-departed-queues", type=int, default=DEFAULT_MAX_DEPARTED_QUEUES, metavar="N",
                   help="queues kept for departed ids not in 0..N-1; the oldest is retired first "
                        f"(default {DEFAULT_MAX_DEPARTED_QUEUES})")
    p.add_argument("--handshake-timeout", type=float, default=DEFAULT_HANDSHAKE_TIMEOUT, metavar="SECONDS")
    p.add_argument("--frame-timeout", type=float, default=DEFAULT_FRAME_TIMEOUT, metavar="SECONDS",
                   help="seconds a worker has to finish a frame it has begun to send, else it is "
                        f"disconnected (default {DEFAULT_FRAME_TIMEOUT:g})")
    p.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS, metavar="N")
    p.add_argument("--overflow", choices=[o.value for o in OverflowPolicy], default=OverflowPolicy.DROP_NEWEST.value)
    p.add_argument("--mode", type=lambda s: int(s, 8), default=0o600, metavar="OCTAL", help="socket file mode (default 600)")
    p.add_argument("--lifecycle-events", action="store_true",
                   help="also deliver workerbus/welcome, joined and left events (docs/embedding.md)")
    p.add_argument("--group", default=None, metavar="NAME",
                   help="group of the socket file (with --mode 660 lets that group connect)")
    p.add_argument("--allow-uid", type=int, action="append", default=[], metavar="UID",
                   help="also serve peers with this uid (repeatable; default: own uid and root)")
    p.add_argument("--max-header-bytes", type=int, default=None, metavar="N",
                   help="largest HTTP upgrade request head (http transport; default 16384)")
    p.add_argument("--stats-listen", default=None, metavar="unix:PATH",
                   help="serve GET /metrics (Prometheus) and GET /stats (JSON) on this socket")
    _add_common(p)
    p.set_defaults(func=_cmd_broker)

    p = sub.add_parser("stats", help="print a broker's statistics (from its --stats-listen socket)")
    p.add_argument("address", metavar="unix:PATH")
    p.add_argument("--json", action="store_true", help="JSON instead of the Prometheus text format")
    p.add_argument("--timeout", type=float, default=5.0, help="give up after SECONDS")
    p.add_argument("--log-level", default="WARNING")
    p.set_defaults(func=_cmd_stats)

    p = sub.add_parser("publish", help="publish one event and exit")
    p.add_argument("address", metavar="unix:PATH")
    p.add_argument("source")
    p.add_argument("event")
    p.add_argument("data", nargs="?", default=None, metavar="JSON-DATA")
    p.add_argument("--target", default="all", help="all | others | worker:N | unique:KEY")
    p.add_argument("--id", type=int, default=None, dest="worker_id",
                   help="worker id in the hello (default -2 native, so a `tail` on -1 is not "
                        "replaced; -1 kong, since a real lua-resty-events broker closes ids "
                        "it has no queue for)")
    p.add_argument("--timeout", type=float, default=5.0, help="give up after SECONDS")
    _add_common(p)
    p.set_defaults(func=_cmd_publish, log_level="WARNING")

    p = sub.add_parser("tail", help="print every event as one JSON line until interrupted")
    p.add_argument("address", metavar="unix:PATH")
    p.add_argument("--id", type=int, default=-1, dest="worker_id", help="worker id in the hello (default -1)")
    p.add_argument("--count", type=int, default=0, help="exit after N events (default: never)")
    _add_common(p)
    p.set_defaults(func=_cmd_tail, log_level="WARNING")

    p = sub.add_parser("demo", help="a broker and N worker processes publishing to each other")
    p.add_argument("--workers", type=int, default=4, metavar="N")
    p.add_argument("--transport", choices=("http", "stream"), default="http")
    p.add_argument("--asgi", action="store_true",
                   help="instead: run examples/asgi_app.py under uvicorn with N workers (embedded bus)")
    p.add_argument("--log-level", default="WARNING")
    p.set_defaults(func=_cmd_demo)

    try:
        from .conformance.cli import add_parser as add_conformance
    except ImportError:  # pragma: no cover - the kit is part of the package
        pass
    else:
        add_conformance(sub)
    from .bench.cli import add_parser as add_bench

    add_bench(sub)
    return parser


def _run(args: argparse.Namespace, func: Callable[[], Awaitable[int]]) -> int:
    backend = getattr(args, "backend", "asyncio")
    backend_options: dict[str, Any] = {}
    if backend == "uvloop":
        # uvloop is not a backend of its own: it is an asyncio loop that anyio can use.
        backend, backend_options = "asyncio", {"use_uvloop": True}
    return anyio.run(func, backend=backend, backend_options=backend_options)


async def _until_signal(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            logger.info("received %s, stopping", signal.Signals(signum).name)
            scope.cancel()
            return


def _cmd_broker(args: argparse.Namespace) -> int:
    try:
        broker = Broker(
            transport=args.transport,
            profile=args.profile,
            expected_workers=args.workers,
            max_queue_len=args.max_queue_len,
            max_payload_len=args.max_payload_len,
            unique_timeout=args.unique_timeout,
            queue_grace=args.queue_grace,
            broadcast_grace=args.broadcast_grace,
            max_departed_queues=args.max_departed_queues,
            handshake_timeout=args.handshake_timeout,
            frame_timeout=args.frame_timeout,
            max_connections=args.max_connections,
            overflow=OverflowPolicy(args.overflow),
            lifecycle_events=args.lifecycle_events,
            allowed_uids=default_trusted_uids(args.allow_uid),
            max_header_bytes=args.max_header_bytes,
        )
    except ValueError as exc:
        print(f"workerbus broker: {exc}", file=sys.stderr)
        return 2

    async def run() -> int:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_until_signal, tg.cancel_scope)
            await tg.start(functools.partial(broker.serve, args.listen, mode=args.mode, group=args.group))
            if args.stats_listen:
                from .statsserver import serve_stats

                await tg.start(
                    functools.partial(
                        serve_stats,
                        args.stats_listen,
                        broker.statistics,
                        mode=args.mode,
                        group=args.group,
                        allowed_uids=broker.allowed_uids,
                    )
                )
        stats = broker.statistics()
        logger.info(
            "broker stopped: %d publishes, %d deliveries, %d dropped",
            stats.router.publishes, stats.router.deliveries, stats.router.dropped,
        )
        return 0

    try:
        return _run(args, run)
    except Exception as group:
        # The task group reports even one failure as a group: show the one error.
        err = _single_error(group)
        if isinstance(err, AddressInUse):
            print(f"workerbus broker: {err}", file=sys.stderr)
            return 1
        if isinstance(err, ValueError):
            print(f"workerbus broker: {err}", file=sys.stderr)
            return 2
        if isinstance(err, OSError):
            # e.g. the path is a planted symlink or a regular file, or no such directory
            print(f"workerbus broker: cannot listen: {err}", file=sys.stderr)
            return 1
        raise


def _single_error(exc: BaseException) -> BaseException:
    inner = getattr(exc, "exceptions", None)
    while inner is not None and len(inner) == 1:
        exc = inner[0]
        inner = getattr(exc, "exceptions", None)
    return exc


def _cmd_stats(args: argparse.Namespace) -> int:
    import httpx

    from .statsserver import fetch_stats

    try:
        sys.stdout.write(fetch_stats(args.address, as_json=args.json, timeout=args.timeout))
    except ValueError as exc:
        print(f"workerbus stats: {exc}", file=sys.stderr)
        return 2
    except httpx.HTTPError as exc:
        print(f"workerbus stats: cannot fetch statistics from {args.address}: {exc}", file=sys.stderr)
        return 1
    return 0


def _client(args: argparse.Namespace) -> Client:
    worker_id = args.worker_id
    if worker_id is None:
        worker_id = -1 if args.profile == "kong" else -2
    return Client(args.address, transport=args.transport, profile=args.profile, worker_id=worker_id)


def _cmd_publish(args: argparse.Namespace) -> int:
    try:
        data = None if args.data is None else json.loads(args.data)
    except json.JSONDecodeError as exc:
        print(f"workerbus publish: JSON-DATA is not valid JSON: {exc}", file=sys.stderr)
        return 2

    async def run() -> int:
        with anyio.fail_after(args.timeout):
            async with _client(args) as bus:
                await bus.wait_ready()
                await bus.publish(args.source, args.event, data, args.target)
                await bus.flush()
        return 0

    try:
        return _run(args, run)
    except TimeoutError:
        print(f"workerbus publish: no broker reachable at {args.address} within {args.timeout}s", file=sys.stderr)
        return 1
    except (BusError, ValueError) as exc:
        print(f"workerbus publish: {exc}", file=sys.stderr)
        return 1


def _cmd_tail(args: argparse.Namespace) -> int:
    async def run() -> int:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_until_signal, tg.cancel_scope)
            async with _client(args) as bus, bus.events() as events:
                seen = 0
                async for ev in events:
                    line = {"source": ev.source, "event": ev.event, "data": ev.data, "wid": ev.wid}
                    print(json.dumps(line, default=_jsonable), flush=True)
                    seen += 1
                    if args.count and seen >= args.count:
                        break
            tg.cancel_scope.cancel()
        return 0

    try:
        return _run(args, run)
    except (BusError, ValueError) as exc:
        print(f"workerbus tail: {exc}", file=sys.stderr)
        return 1


def _jsonable(value: object) -> object:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "backslashreplace")
    return repr(value)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.asgi:
        from .demo_asgi import run_asgi_demo

        return run_asgi_demo(workers=args.workers, transport=args.transport)
    return run_demo(workers=args.workers, transport=args.transport)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=str(args.log_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
