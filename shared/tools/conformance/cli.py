"""The ``workerbus conformance broker|serve`` command line."""

from __future__ import annotations

import argparse
import importlib
import socket
import sys
from typing import Any

from shared.tools.cliargs import output_file
from shared.tools.conformance.casekit import KitConfig
from shared.tools.conformance.profiles import PROFILES, Profile
from shared.tools.conformance.runner import run_suite, select, write_json
from shared.unixpath import socket_path

__all__ = ["add_parser"]


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _common(p: argparse.ArgumentParser, *, optional_address: bool = False) -> None:
    p.add_argument("address", metavar="unix:PATH", nargs="?" if optional_address else None,
                   help="the broker's Unix socket address")
    p.add_argument("--transport", choices=("http", "stream"), default="http",
                   help="connection start: HTTP upgrade or none (default http)")
    p.add_argument("--profile", choices=sorted(PROFILES), default="native",
                   help="frame header width and codec (default native)")
    p.add_argument("--json", metavar="REPORT", type=output_file,
                   help="also write a JSON report to this file (default: none)")
    p.add_argument("--handshake-deadline", type=_positive, default=5.0, metavar="SECONDS",
                   help="the broker's handshake+hello deadline (default 5)")
    p.add_argument("--unique-timeout", type=_positive, default=5.0, metavar="SECONDS",
                   help="the broker's unique dedup window (default 5)")
    p.add_argument("--workers", type=_count, metavar="N",
                   help="the broker's pre-created worker ids 0..N-1, if any; enables the cases "
                        "on those ids (default: none)")
    p.add_argument("--max-payload", type=_count, metavar="BYTES",
                   help="the broker's frame payload limit, if lower than the profile's "
                        "(default: the profile's)")


def add_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register ``conformance`` with its ``broker`` and ``serve`` subcommands."""
    conf = subparsers.add_parser(
        "conformance", help="protocol conformance kit: test a broker, or judge clients",
        description="Black-box protocol conformance kit (see docs/conformance.md).")
    # The workerbus main configures logging from log_level for every subcommand; the kit
    # reports on stdout and has nothing to log.
    conf.set_defaults(log_level="WARNING")
    sub = conf.add_subparsers(dest="conformance_command", metavar="{broker,serve}")
    sub.required = True

    broker = sub.add_parser("broker", help="run the conformance cases against a running broker")
    _common(broker, optional_address=True)  # not needed for --list
    broker.add_argument("--only", action="append", metavar="PATTERN",
                        help="run cases whose name contains PATTERN or matches it as a glob "
                             "(repeatable; default: every case)")
    broker.add_argument("--timeout", type=_positive, default=5.0, metavar="SECONDS",
                        help="deadline for each case's waits (default 5)")
    broker.add_argument("--id-base", type=int, default=1000, metavar="ID",
                        help="first worker id the kit uses; case i uses ID+10i..ID+10i+9 "
                             "(default 1000)")
    broker.add_argument("--no-extensions", action="store_false", dest="extensions",
                        help="the broker does not implement the negotiated native extensions "
                             "(welcome, ping/pong barrier; docs/protocol.md): skip their cases "
                             "(default: native brokers are expected to)")
    broker.add_argument("--list", action="store_true", help="list the selected cases and exit")
    broker.set_defaults(func=run_broker_command)

    serve = sub.add_parser("serve", help="run a strict broker that reports client violations")
    _common(serve)
    serve.add_argument("--queue-grace", type=_positive, default=30.0, metavar="SECONDS",
                       help="how long a gone worker's queue is kept (default 30)")
    serve.set_defaults(func=run_serve_command)


def _address(text: str | None) -> str | None:
    if text is None:
        print("conformance: the broker's address (unix:PATH) is required", file=sys.stderr)
        return None
    try:
        return socket_path(text)
    except ValueError as exc:
        print(f"conformance: {exc}", file=sys.stderr)
        return None


def _unreachable(path: str) -> str | None:
    """Why nothing accepts connections at ``path``, or None if something does."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(5.0)
    try:
        probe.connect(path)
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        probe.close()
    return None


def _profile(name: str) -> Profile | None:
    profile = PROFILES[name]
    if not profile.native:
        try:
            importlib.import_module("shared.luabuf")
        except ImportError as exc:
            print(f"conformance: the kong profile needs shared.luabuf: {exc}", file=sys.stderr)
            return None
    return profile


def run_broker_command(args: argparse.Namespace) -> int:
    if args.list:
        for _, c in select(args.only):
            print(f"{c.name}: {c.summary}")
        return 0
    path, profile = _address(args.address), _profile(args.profile)
    if path is None or profile is None:
        return 2
    if not select(args.only):
        print(f"conformance: no case matches {args.only}", file=sys.stderr)
        return 2
    problem = _unreachable(path)
    if problem is not None:
        # One line, instead of every case failing with the same reason.
        print(f"conformance: cannot connect to {args.address}: {problem}", file=sys.stderr)
        return 2
    cfg = KitConfig(
        address=args.address, path=path, transport=args.transport, profile=profile,
        case_timeout=args.timeout, handshake_deadline=args.handshake_deadline,
        unique_timeout=args.unique_timeout, workers=args.workers, max_payload=args.max_payload,
        id_base=args.id_base, extensions=args.extensions,
    )
    report = run_suite(cfg, args.only, sys.stdout)
    if args.json:
        write_json(report.to_json(), args.json)
    return 1 if report.totals["failed"] else 0


def run_serve_command(args: argparse.Namespace) -> int:
    # Imported here: the serve side needs anyio, the broker side does not.
    from shared.tools.conformance.serve import ServeConfig, run_serve

    path, profile = _address(args.address), _profile(args.profile)
    if path is None or profile is None:
        return 2
    cfg = ServeConfig(
        address=args.address, path=path, transport=args.transport, profile=profile,
        handshake_deadline=args.handshake_deadline, unique_timeout=args.unique_timeout,
        workers=args.workers, max_payload=args.max_payload, queue_grace=args.queue_grace,
    )
    return run_serve(cfg, sys.stdout, args.json)
