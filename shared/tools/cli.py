"""The ``workerbus`` command: broker, publish, tail, demo, conformance, bench.

Each subcommand is a thin shell over the library; long-running ones stop cleanly on
SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio

from shared.broker import (
    DEFAULT_FRAME_TIMEOUT,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    Broker,
)
from shared.client import Client
from shared.errors import AddressInUse, BusError, PayloadTooLarge
from shared.messages import TargetKind, parse_target
from shared.peercred import default_trusted_uids
from shared.router import (
    DEFAULT_BROADCAST_GRACE,
    DEFAULT_MAX_DEPARTED_QUEUES,
    DEFAULT_MAX_QUEUE_LEN,
    DEFAULT_QUEUE_GRACE,
    DEFAULT_UNIQUE_TIMEOUT,
    MAX_EXPECTED_WORKERS,
    OverflowPolicy,
)
from shared.transportnames import load_transport

from .cliargs import (
    LOG_LEVELS,
    Parser,
    log_level,
    non_negative_float,
    non_negative_int,
    octal_mode,
    positive_float,
    positive_int,
    unix_address,
    up_to,
    worker_id,
)

__all__ = ["build_parser", "main"]

logger = logging.getLogger("workerbus")

#: Worker processes ``workerbus demo`` starts at most (per node with --nodes): it is a
#: demonstration, and every worker is a Python process of its own.
MAX_DEMO_WORKERS = 64
#: Nodes of ``workerbus demo --nodes`` at most (each is a broker process and its workers).
MAX_DEMO_NODES = 8


def _demo_nodes(text: str) -> int:
    nodes = up_to(MAX_DEMO_NODES, least=0)(text)
    if nodes == 1:
        raise argparse.ArgumentTypeError("a cluster needs at least 2 nodes (0: one host, no cluster)")
    return nodes


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--transport", choices=("http", "stream"), default="http",
                   help="how a connection starts: an HTTP/1.1 upgrade (http) or nothing (stream) "
                        "(default %(default)s)")
    p.add_argument("--profile", choices=("native", "kong"), default="native",
                   help="wire format: native (2-byte frames, MessagePack) or kong "
                        "(lua-resty-events 0.3) (default %(default)s)")
    p.add_argument(
        "--backend",
        choices=("asyncio", "uvloop", "trio"),
        default="asyncio",
        help="event loop: asyncio, uvloop (asyncio on uvloop, if installed) or trio "
             "(default %(default)s)",
    )
    _add_log_level(p, "INFO")


def _add_log_level(p: argparse.ArgumentParser, default: str) -> None:
    # %(default)s, not the literal: a subcommand's set_defaults(log_level=...) changes it.
    p.add_argument("--log-level", type=log_level, default=default, metavar="LEVEL",
                   help=f"log to stderr from this level on: {', '.join(LOG_LEVELS)} "
                        "(default %(default)s)")


def _group(text: str) -> str | int:
    # (a number is a gid, as chgrp takes it; shared.listener resolves a name)
    return int(text) if text.isdigit() else text


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="workerbus", description="An event bus between worker processes.")
    parser.add_argument("--version", action="version", version=f"workerbus {_version()}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("broker", help="run a broker in the foreground")
    p.add_argument("--listen", required=True, type=unix_address, metavar="unix:PATH",
                   help="the Unix socket to serve (an absolute path; required)")
    p.add_argument("--workers", type=up_to(MAX_EXPECTED_WORKERS, least=0), default=0, metavar="N",
                   help="pre-create queues for ids 0..N-1, so they miss nothing before they "
                        f"connect; at most {MAX_EXPECTED_WORKERS} (default %(default)s)")
    p.add_argument("--unique-timeout", type=positive_float, default=DEFAULT_UNIQUE_TIMEOUT, metavar="SECONDS",
                   help="a unique:KEY event is delivered once per KEY within this window "
                        "(default %(default)s)")
    p.add_argument("--max-queue-len", type=positive_int, default=DEFAULT_MAX_QUEUE_LEN, metavar="N",
                   help="events a worker's queue holds before --overflow applies (default %(default)s)")
    p.add_argument("--max-payload-len", type=positive_int, default=None, metavar="N",
                   help="largest frame payload accepted, in bytes (default: the profile's "
                        "maximum, 65535 native, 16777215 kong)")
    p.add_argument("--queue-grace", type=non_negative_float, default=DEFAULT_QUEUE_GRACE, metavar="SECONDS",
                   help="how long a disconnected worker's queue is kept for its return "
                        "(default %(default)s)")
    p.add_argument("--broadcast-grace", type=non_negative_float, default=DEFAULT_BROADCAST_GRACE, metavar="SECONDS",
                   help="seconds the queue of a departed id not in 0..N-1 keeps taking broadcasts; "
                        "later ones are counted as missed (default %(default)s)")
    p.add_argument("--max-departed-queues", type=non_negative_int, default=DEFAULT_MAX_DEPARTED_QUEUES, metavar="N",
                   help="queues kept for departed ids not in 0..N-1; the oldest is retired first "
                        "(default %(default)s)")
    p.add_argument("--frame-timeout", type=positive_float, default=DEFAULT_FRAME_TIMEOUT, metavar="SECONDS",
                   help="seconds a worker has to finish a frame it has begun to send, else it is "
                        "disconnected (default %(default)s)")
    p.add_argument("--handshake-timeout", type=positive_float, default=DEFAULT_HANDSHAKE_TIMEOUT,
                   metavar="SECONDS",
                   help="a new connection must finish its upgrade and hello within this "
                        "(default %(default)s)")
    p.add_argument("--max-connections", type=positive_int, default=DEFAULT_MAX_CONNECTIONS, metavar="N",
                   help="connections served at once; more are refused (default %(default)s)")
    p.add_argument("--overflow", choices=[o.value for o in OverflowPolicy], default=OverflowPolicy.DROP_NEWEST.value,
                   help="what a full worker queue does: drop the new event, drop the oldest, "
                        "or disconnect the worker (default %(default)s)")
    p.add_argument("--mode", type=octal_mode, default=0o600, metavar="OCTAL",
                   help="permission bits of the socket file(s) (default 600)")
    p.add_argument("--lifecycle-events", action="store_true",
                   help="also deliver workerbus/welcome, joined and left events "
                        "(docs/embedding.md) (default: off)")
    p.add_argument("--group", default=None, type=_group, metavar="NAME|GID",
                   help="group of the socket file, so that with --mode 660 its members can "
                        "reach it; the broker still serves only trusted uids (--allow-uid) "
                        "(default: the broker's own group)")
    p.add_argument("--allow-uid", type=non_negative_int, action="append", default=[], metavar="UID",
                   help="also serve peers with this uid (repeatable; default: own uid and root)")
    p.add_argument("--max-header-bytes", type=positive_int, default=None, metavar="N",
                   help="largest HTTP upgrade request head (http transport; default 16384)")
    p.add_argument("--stats-listen", default=None, type=unix_address, metavar="unix:PATH",
                   help="serve GET /metrics (Prometheus) and GET /stats (JSON) on this socket "
                        "(default: none)")
    p.add_argument("--bridge", default=None, metavar="URL",
                   help="join a cluster through nats://HOST:PORT, redis://HOST:PORT or "
                        "redis+unix:///PATH (docs/cluster.md) (default: none, host-local only)")
    p.add_argument("--node", default=None, metavar="NAME",
                   help="this node's name in the cluster (default: the host name)")
    p.add_argument("--cluster", default="workerbus", metavar="NAME",
                   help="the cluster's subject/channel namespace (default %(default)s)")
    p.add_argument("--bridge-buffer", type=positive_int, default=10000, metavar="N",
                   help="cluster publishes held while the engine is unreachable (default %(default)s)")
    _add_common(p)
    p.set_defaults(func=_cmd_broker)

    p = sub.add_parser("stats", help="print a broker's statistics (from its --stats-listen socket)")
    p.add_argument("address", type=unix_address, metavar="unix:PATH", help="the broker's --stats-listen socket")
    p.add_argument("--json", action="store_true",
                   help="JSON instead of the Prometheus text format (default: Prometheus)")
    p.add_argument("--timeout", type=positive_float, default=5.0, metavar="SECONDS",
                   help="give up after this long (default %(default)s)")
    _add_log_level(p, "WARNING")
    p.set_defaults(func=_cmd_stats)

    from .top import add_parser as add_top

    add_top(sub)

    p = sub.add_parser(
        "publish",
        help="publish one event; exit 0 once the broker confirmed it routed the event",
        description="Publish one event. Native profile: exits 0 only once the broker confirmed "
        "(welcome + ping/pong barrier) that it read and routed the event. Kong profile (no "
        "barrier): exits 0 once the event came back to the publisher (target all), or once "
        "it was written (unique targets). Otherwise one line on stderr and a non-zero exit.",
    )
    p.add_argument("address", type=unix_address, metavar="unix:PATH", help="the broker's socket")
    p.add_argument("source", help="the event's source, e.g. cache")
    p.add_argument("event", help="the event's name, e.g. invalidate")
    p.add_argument("data", nargs="?", default=None, metavar="JSON-DATA",
                   help="the event's data as JSON (default: none)")
    p.add_argument("--target", default="all",
                   help="who gets it: all | others | worker:N | unique:KEY (default %(default)s)")
    p.add_argument("--scope", choices=("local", "cluster"), default="local",
                   help="cluster: also the other nodes' workers (broker --bridge; docs/cluster.md) "
                        "(default %(default)s)")
    p.add_argument("--id", type=worker_id, default=None, dest="worker_id",
                   help="worker id in the hello (default: native, one derived from the pid, "
                        "held by nobody else; kong, -1, since a real lua-resty-events broker "
                        "closes ids it has no queue for)")
    p.add_argument("--timeout", type=positive_float, default=5.0, metavar="SECONDS",
                   help="give up after this long, connect to confirmation (default %(default)s)")
    _add_common(p)
    p.set_defaults(func=_cmd_publish, log_level="WARNING")

    p = sub.add_parser(
        "tail",
        help="print every event as one JSON line until interrupted",
        description="Print every event as one JSON line until interrupted. When events come "
        "faster than they are printed, the tail stops reading and the broker's queue holds "
        "them; what the broker has to drop is printed as its workerbus/dropped event "
        '(data {"count": N, "total": T}), so printed events plus reported drops is what '
        "was published.",
    )
    p.add_argument("address", type=unix_address, metavar="unix:PATH", help="the broker's socket")
    p.add_argument("--id", type=worker_id, default=None, dest="worker_id",
                   help="worker id in the hello (default: native, one derived from the pid, so "
                        "that two tails never take each other's place; kong, -1)")
    p.add_argument("--count", type=non_negative_int, default=0, metavar="N",
                   help="exit after N events, not counting workerbus/dropped reports (default 0: never)")
    p.add_argument("--timeout", type=positive_float, default=None, metavar="SECONDS",
                   help="stop after SECONDS (default: never); exit 0 then, or 1 if no broker "
                        "was reached, or if --count events did not all arrive in time")
    _add_common(p)
    p.set_defaults(func=_cmd_tail, log_level="WARNING")

    p = sub.add_parser("info", help="this installation: version, Python, which modules run compiled",
                       description="Print workerbus's version, the Python running it, and which "
                       "modules of the optional compiled build (docs/compiled.md) are in use.")
    _add_log_level(p, "WARNING")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("demo", help="a broker and N worker processes publishing to each other")
    p.add_argument("--workers", type=up_to(MAX_DEMO_WORKERS), default=4, metavar="N",
                   help=f"worker processes, at most {MAX_DEMO_WORKERS} (default %(default)s)")
    p.add_argument("--transport", choices=("http", "stream"), default=None,
                   help="how connections start (default http; the --nodes demo uses stream)")
    p.add_argument("--nodes", type=_demo_nodes, default=0, metavar="N",
                   help=f"instead: N nodes (2..{MAX_DEMO_NODES}) of --workers workers each, joined "
                        "through a NATS server the demo starts (docs/cluster.md) (default: 0, one host)")
    p.add_argument("--asgi", action="store_true",
                   help="instead: run the example ASGI app (examples/asgi_app.py) under uvicorn with N workers "
                        "(embedded bus) (default: off)")
    _add_log_level(p, "WARNING")
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
            break
    # Leaving the receiver puts the default handlers back: a second Ctrl-C (or a SIGTERM
    # that a supervisor or `timeout` sends to the whole group) would then interrupt the
    # orderly stop with a KeyboardInterrupt traceback. The stop is bounded; let it end.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    scope.cancel()


def _cmd_broker(args: argparse.Namespace) -> int:
    try:
        bridge = None
        if args.bridge:
            from shared.bridges import make_bridge

            bridge = make_bridge(
                args.bridge, node=args.node, cluster=args.cluster, max_buffer=args.bridge_buffer
            )
        elif args.node:
            raise ValueError("--node needs --bridge")
        broker = Broker(
            transport=load_transport(args.transport, max_header_bytes=args.max_header_bytes),
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
            bridge=bridge,
        )
    except (ValueError, ImportError) as exc:
        print(f"workerbus broker: {exc}", file=sys.stderr)
        return 2

    async def run() -> int:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_until_signal, tg.cancel_scope)
            await tg.start(functools.partial(broker.serve, args.listen, mode=args.mode, group=args.group))
            if args.stats_listen:
                # After the bus socket: a stats socket that answers means the broker serves
                # (tests and readiness probes rely on it).
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

    where = args.address
    hint = "give the address the broker was started with as --stats-listen"
    try:
        sys.stdout.write(fetch_stats(where, as_json=args.json, timeout=args.timeout))
    except ValueError as exc:
        print(f"workerbus stats: {exc}", file=sys.stderr)
        return 2
    except httpx.HTTPStatusError as exc:
        answer = exc.response
        upgrade = answer.headers.get("upgrade", "").lower()
        if answer.status_code == 426 and "kong-worker-events" in upgrade:
            print(f"workerbus stats: {where} is a bus socket (http transport), not a statistics "
                  f"socket; {hint}", file=sys.stderr)
        elif answer.status_code == 400 and "on the stream socket" in answer.text:
            # A stream-transport broker recognises the HTTP request and says so (streambus).
            print(f"workerbus stats: {where} is a bus socket (stream transport), not a statistics "
                  f"socket; {hint}", file=sys.stderr)
        else:
            print(f"workerbus stats: {where} answered {answer.status_code} {answer.reason_phrase}: "
                  f"not a workerbus statistics socket; {hint}", file=sys.stderr)
        return 1
    except httpx.RemoteProtocolError:
        # A stream-transport bus socket takes the request for a bad frame and hangs up.
        print(f"workerbus stats: {where} closed the connection without an HTTP answer: not a "
              f"statistics socket (a bus socket of the stream transport does that); {hint}",
              file=sys.stderr)
        return 1
    except httpx.TimeoutException:
        print(f"workerbus stats: no answer from {where} within {args.timeout:g}s: is it a "
              f"statistics socket? {hint}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"workerbus stats: cannot fetch statistics from {where}: {exc}", file=sys.stderr)
        return 1
    return 0


def _client(args: argparse.Namespace) -> Client:
    # No --id: the client's default (native: derived from the pid; kong: -1).
    return Client(
        args.address, transport=load_transport(args.transport), profile=args.profile, worker_id=args.worker_id
    )


class _PublishClient(Client):
    """publish's client: also tells when a connection ended (the kong profile has no
    barrier, so a connection the broker closed is the only sign of a refused publish)."""

    def __init__(self, address: str, **options: Any) -> None:
        super().__init__(address, **options)
        self.lost = anyio.Event()

    def _session_ended(self) -> None:
        self.lost.set()


async def _publish_kong(bus: _PublishClient, args: argparse.Namespace, data: object) -> None:
    """Kong profile: confirmed when our event comes back (the broker delivers ``all`` to
    the publisher too); ``unique`` may go to another worker, so it is only written."""
    if parse_target(args.target).kind is not TargetKind.ALL:
        await bus.publish(args.source, args.event, data, args.target)
        await bus.flush()
        return
    async with bus.events(args.source, args.event) as events, anyio.create_task_group() as tg:

        async def watch() -> None:
            await bus.lost.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        await bus.publish(args.source, args.event, data, args.target)
        async for ev in events:
            if ev.wid == bus.worker_id:
                tg.cancel_scope.cancel()
                return
    raise BusError(
        f"the broker at {args.address} closed the connection before the event came back; "
        "with --profile kong that usually means a native-profile broker (drop --profile kong), "
        f"or one that refuses worker id {bus.worker_id}"
    )


def _not_json(name: str) -> object:
    # Python's json takes NaN and Infinity, which JSON does not have (and tail could not
    # print back as JSON).
    raise ValueError(f"{name} is not a JSON value")


def _cmd_publish(args: argparse.Namespace) -> int:
    try:
        data = None if args.data is None else json.loads(args.data, parse_constant=_not_json)
    except (ValueError, RecursionError) as exc:  # (JSONDecodeError is a ValueError)
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        print(f"workerbus publish: JSON-DATA is not valid JSON: {why}", file=sys.stderr)
        return 2
    if not args.source or not args.event:
        print("workerbus publish: SOURCE and EVENT must not be empty", file=sys.stderr)
        return 2
    try:
        target = parse_target(args.target).with_scope(args.scope)  # refuse a bad target before connecting
        if target.worker_id is not None:
            worker_id(str(target.worker_id))  # (what the wire can carry)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        print(f"workerbus publish: {exc}", file=sys.stderr)
        return 2
    if args.timeout <= 0:
        print("workerbus publish: --timeout must be greater than 0", file=sys.stderr)
        return 2
    stage = ["reach"]
    if str(args.log_level).upper() == "WARNING":
        # The outcome is one line of our own (below), with the reason; the client's
        # reconnect warnings would only repeat it.
        logging.getLogger("shared.client").setLevel(logging.ERROR)
    clients: list[Client] = []

    async def run() -> int:
        # Half the time for the welcome, so a peer that never answers is named as such
        # (NoWelcome) before the overall deadline.
        bus = _PublishClient(
            args.address,
            transport=load_transport(args.transport),
            profile=args.profile,
            worker_id=args.worker_id,
            connect_timeout=args.timeout / 2,
        )
        clients.append(bus)
        with anyio.fail_after(args.timeout):
            async with bus:
                await bus.wait_ready()
                stage[0] = "confirm"
                if bus.welcome is None:
                    await _publish_kong(bus, args, data)
                    return 0
                try:
                    await bus.publish(args.source, args.event, data, args.target, scope=args.scope)
                except PayloadTooLarge as exc:
                    raise BusError(
                        f"the event is {exc.size} bytes encoded, over the broker's limit of "
                        f"{exc.limit} bytes (max_payload_len from its welcome); nothing was sent"
                    ) from None
                await bus.flush()
        return 0

    try:
        return _run(args, run)
    except TimeoutError:
        if stage[0] == "reach":
            error = clients[0].last_error if clients else None
            why = "" if error is None else f": {error or type(error).__name__}"
            print(f"workerbus publish: no broker reachable at {args.address} within {args.timeout}s{why}", file=sys.stderr)
        else:
            print(f"workerbus publish: the broker at {args.address} did not confirm the event within {args.timeout}s", file=sys.stderr)
        return 1
    except (BusError, ValueError) as exc:
        print(f"workerbus publish: {exc}", file=sys.stderr)
        return 1


def _cmd_tail(args: argparse.Namespace) -> int:
    seen = 0
    connected = False

    async def print_events(bus: Client) -> None:
        nonlocal seen, connected
        out = sys.stdout
        dumps = functools.partial(json.dumps, default=_jsonable)
        # The events iterator is subscribed before the connection starts, and has the
        # default 1024-event buffer: when printing falls behind, the client stops
        # reading (backpressure) and the broker's queue takes the backlog.
        async with bus.events() as events:
            await bus.wait_ready()
            connected = True
            while True:
                try:
                    ev = events.receive_nowait()
                except anyio.WouldBlock:
                    out.flush()  # one flush per burst, not per line
                    ev = await events.receive()
                line = {"source": ev.source, "event": ev.event, "data": ev.data, "wid": ev.wid}
                if ev.node is not None:
                    line["node"] = ev.node
                out.write(dumps(line) + "\n")
                if ev.source == "workerbus" and ev.event == "dropped":
                    continue  # a report about events, not one of them
                seen += 1
                if args.count and seen >= args.count:
                    break
        out.flush()

    async def run() -> int:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_until_signal, tg.cancel_scope)
            with anyio.move_on_after(args.timeout if args.timeout is not None else float("inf")):
                async with _client(args) as bus:
                    await print_events(bus)
            tg.cancel_scope.cancel()
        sys.stdout.flush()
        if args.timeout is not None and not connected:
            print(f"workerbus tail: no broker reachable at {args.address} within {args.timeout}s", file=sys.stderr)
            return 1
        if args.timeout is not None and args.count and seen < args.count:
            print(f"workerbus tail: {seen} of {args.count} events in {args.timeout}s", file=sys.stderr)
            return 1
        return 0

    try:
        return _run(args, run)
    except Exception as group:
        # (the task group reports even one failure as a group: show the one error)
        err = _single_error(group)
        if isinstance(err, (BusError, ValueError)):
            print(f"workerbus tail: {err}", file=sys.stderr)
            return 1
        raise


def _jsonable(value: object) -> object:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "backslashreplace")
    return repr(value)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("workerbus")
    except metadata.PackageNotFoundError:
        return "not installed (run from a checkout)"


def _cmd_info(args: argparse.Namespace) -> int:
    from shared import compiled

    print(f"workerbus {_version()}")
    print(f"python {platform.python_version()} ({sys.executable})")
    for name, native in compiled.status().items():
        print(f"{name}: {'compiled' if native else 'pure Python'}")
    print(f"compiled: {compiled.summary()}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import interrupts
    from .demo import run_demo

    # SIGTERM as Ctrl-C: the demos stop their brokers and workers in `finally`, which the
    # default SIGTERM (the process just dies) would skip, leaving them running.
    interrupts.install()
    if args.nodes and (args.asgi or args.transport is not None):
        print("workerbus demo: --nodes runs its own brokers over the stream transport; it takes "
              "neither --asgi nor --transport", file=sys.stderr)
        return 2
    transport = args.transport or "http"
    try:
        if args.nodes:
            from .demo_cluster import run_cluster_demo

            return run_cluster_demo(nodes=args.nodes, workers=args.workers)
        if args.asgi:
            from .demo_asgi import run_asgi_demo

            return run_asgi_demo(workers=args.workers, transport=transport)
        return run_demo(workers=args.workers, transport=transport)
    except KeyboardInterrupt:
        print("workerbus demo: interrupted; its processes are stopped", file=sys.stderr)
        return 130


def _reader_gone(exc: BaseException) -> bool:
    """Whether ``exc`` is (a group of one) BrokenPipeError: stdout's reader stopped
    reading, e.g. ``workerbus tail ... | head -1``."""
    return isinstance(_single_error(exc), BrokenPipeError)


def _chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)command that ``args`` chose, so that its errors name it."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, subs[0].dest, None) if subs else None
        if not subs or name not in subs[0].choices:
            return parser
        parser = subs[0].choices[name]


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # (argparse would blame the top-level command: "workerbus: unrecognized arguments")
        _chosen_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=str(args.log_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        status = args.func(args)
        sys.stdout.flush()
    except Exception as exc:
        if not _reader_gone(exc):
            raise
        # As a shell tool killed by SIGPIPE (status 128 + 13), without a traceback; stdout
        # goes to /dev/null so that the interpreter's own flush at exit finds no pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 128 + signal.SIGPIPE
    sys.exit(status)


if __name__ == "__main__":
    main()
