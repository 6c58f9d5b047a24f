"""``workerbus bench``: the command line of the benchmark (hooked into :mod:`shared.tools.cli`)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
from dataclasses import replace
from typing import Any

from shared.tools.cliargs import (
    non_negative_float,
    non_negative_int,
    output_file,
    percent,
    positive_float,
    positive_int,
)
from shared.tools.progress import Progress

from .peers import BASELINES, CLUSTER, PEERS, WORKERBUS, make_peer
from .report import markdown, text_report
from .runner import Settings, estimate_seconds, plan_runs, run_benchmark
from .seed import SeedSettings, estimate_seed_seconds, parse_storms, run_seed
from .subset import DESCRIPTION as SUBSET_DESCRIPTION

__all__ = ["add_parser", "settings_from_args"]

#: Not a peer of the fan-out runs: its own experiment (shared/tools/bench/subset.py).
_SUBSET = "subset"
_GROUPS = {"all": [*PEERS, _SUBSET], "workerbus": list(WORKERBUS), "baselines": list(BASELINES), "cluster": list(CLUSTER)}


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    out: list[str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        for name in _GROUPS.get(part, [part]):
            if name not in PEERS and name != _SUBSET:
                choices = ", ".join([*_GROUPS, *PEERS, _SUBSET])
                raise argparse.ArgumentTypeError(f"unknown scenario {name!r}; choose from {choices}")
            if name not in out:
                out.append(name)
    return out


def _tests(text: str) -> list[str]:
    tests = [t.strip() for t in text.split(",") if t.strip()]
    if not tests or any(t not in ("lat", "thr") for t in tests):
        raise argparse.ArgumentTypeError("--tests takes lat and/or thr")
    return tests


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench`` on the ``workerbus`` command's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "bench",
        help="measure workerbus against its peers (fan-out, latency, cost, seed experiment)",
        description=(
            "Fan-out throughput, latency and cost of workerbus and of what a Python user might "
            "use instead, measured in one run on this machine, plus the seed experiment (uvicorn "
            "+ wrk under an event storm). Peers need the 'bench' extra, Debian's redis-server "
            "and wrk; missing ones are skipped with the reason. See docs/benchmarks.md."
        ),
    )
    d = Settings()
    p.add_argument("--peers", type=_names, default=[*d.scenarios, _SUBSET], metavar="LIST",
                   help="scenarios or groups (all, workerbus, baselines, cluster), comma-separated; "
                        "'subset' is the filter experiment (16 workers each handling 1 of 8 sources); default all")
    p.add_argument("--list", action="store_true", help="list the scenarios and whether they can run here")
    p.add_argument("--tests", type=_tests, default=d.tests, help="lat (fixed rate) and/or thr (flood); default lat,thr")
    p.add_argument("--subs", type=_ints, default=d.subs, metavar="N,..", help="subscriber counts of the floods (default 1,4,16)")
    p.add_argument("--pubs", type=_ints, default=d.pubs, metavar="P,..", help="publisher counts of the floods (default 1,4)")
    p.add_argument("--lat-subs", type=_ints, default=d.lat_subs, metavar="N,..", help="subscribers in the latency test (default 4)")
    p.add_argument("--lat-pubs", type=_ints, default=d.lat_pubs, metavar="P,..", help="publishers in the latency test (default 1)")
    p.add_argument("--events", type=positive_int, default=d.events, help=f"events per flood (default {d.events:,})")
    p.add_argument("--max-deliveries", type=positive_int, default=d.max_deliveries,
                   help=f"cap a flood's events so that events × N ≤ this (default {d.max_deliveries:,})")
    p.add_argument("--rate", type=positive_float, default=d.rate, help="events/s of the latency test (default 10000)")
    p.add_argument("--duration", type=positive_float, default=d.duration, help="seconds of the latency test (default 2)")
    p.add_argument("--reps", type=positive_int, default=d.reps, help="runs per configuration, median reported (default 3)")
    p.add_argument("--timeout", type=positive_float, default=d.timeout, help="limit per run, seconds (default 90)")
    p.add_argument("--budget", type=positive_float, default=d.budget, help="start no run after this many seconds (default 1800)")
    p.add_argument("--wait-idle", type=non_negative_float, default=d.wait_idle,
                   help="first wait up to this many seconds for an idle machine (default 60)")
    p.add_argument("--max-bg", type=percent, default=d.max_bg,
                   help="re-measure a run when other processes used more than this %% of the CPU (default 10)")
    p.add_argument("--retries", type=non_negative_int, default=d.retries, help="re-measurements of a disturbed run (default 2)")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run (< 60 s): N=4 P=1 only, one short run each, no seed experiment")
    p.add_argument("--no-subset", action="store_true",
                   help="skip the subset scenario (16 workers each handling 1 of 8 sources, vs limit-raw-uds)")
    g = p.add_argument_group("seed experiment (uvicorn + wrk under an event storm)")
    s = SeedSettings()
    g.add_argument("--no-seed", action="store_true", help="skip the seed experiment")
    g.add_argument("--seed-only", action="store_true", help="run only the seed experiment")
    g.add_argument("--seed-workers", type=positive_int, default=s.workers, help="uvicorn server processes (default 2)")
    g.add_argument("--seed-duration", type=positive_float, default=s.duration, help="seconds of wrk load per run (default 5)")
    g.add_argument("--seed-connections", type=positive_int, default=s.connections, help="wrk connections (default 32)")
    g.add_argument("--seed-reps", type=positive_int, default=s.reps, help="runs per storm and route, interleaved (default 5)")
    g.add_argument("--seed-storms", type=parse_storms, default=s.storms, metavar="NAME=BURST/SECONDS,..",
                   help="storms: events per burst per worker / seconds between bursts "
                        "(default light=100/0.5,heavy=1000/0.1)")
    g.add_argument("--seed-transport", choices=("stream", "http"), default=s.transport,
                   help="transport of the seed experiment's bus (default %(default)s)")
    g.add_argument("--seed-backend", choices=("asyncio", "uvloop", "trio"), default=s.backend,
                   help="event loop of the seed experiment's broker (default uvloop)")
    g.add_argument("--seed-poll", type=positive_float, default=s.poll, help="poll interval of the shm route, seconds (default 0.01)")
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="PATH", type=output_file, help="write the whole result (every run) as JSON (default: not written)")
    o.add_argument("--from-json", metavar="PATH", help="measure nothing: print (and --markdown) a saved result (default: measure)")
    o.add_argument("--markdown", metavar="PATH", type=output_file, help="write the tables as Markdown (default: not written)")
    o.add_argument("--plot", metavar="DIR",
                   help="write PNG charts (deliveries/s, latency, seed experiment) into DIR; "
                        "needs the 'plot' extra (matplotlib) (default: no charts)")
    p.set_defaults(func=_cmd_bench, log_level="WARNING")
    return p


def settings_from_args(args: argparse.Namespace) -> tuple[Settings, SeedSettings]:
    s = Settings(
        scenarios=[n for n in args.peers if n != _SUBSET], tests=args.tests, subs=args.subs, pubs=args.pubs,
        lat_subs=args.lat_subs, lat_pubs=args.lat_pubs, events=args.events,
        max_deliveries=args.max_deliveries, rate=args.rate, duration=args.duration,
        reps=args.reps, timeout=args.timeout, budget=args.budget, wait_idle=args.wait_idle,
        max_bg=args.max_bg, retries=args.retries, seed=not args.no_seed, subset=_SUBSET in args.peers and not args.no_subset,
    )  # fmt: skip
    seed = SeedSettings(
        workers=args.seed_workers, duration=args.seed_duration, connections=args.seed_connections,
        reps=args.seed_reps, storms=args.seed_storms, transport=args.seed_transport,
        backend=args.seed_backend, poll=args.seed_poll,
    )  # fmt: skip
    if args.quick:
        s = replace(s, subs=[4], pubs=[1], lat_subs=[4], lat_pubs=[1], events=min(s.events, 20_000),
                    duration=min(s.duration, 0.5), reps=1, retries=0, wait_idle=0.0, timeout=30.0,
                    seed=args.seed_only)  # fmt: skip
        seed = replace(seed, reps=1, duration=min(seed.duration, 2.0), warmup=0.5)
    if args.seed_only:
        s = replace(s, tests=[], seed=True, subset=False)
    return s, seed


def _plot_dir_problem(directory: str) -> str | None:
    """Why ``--plot DIR`` cannot work, checked before anything is measured."""
    from .plot import plot_support

    why = plot_support()
    if why is not None:
        return why
    if os.path.exists(directory) and not os.path.isdir(directory):
        return f"--plot {directory}: exists and is not a directory"
    parent = os.path.dirname(os.path.abspath(directory))
    if not os.path.isdir(parent):
        return f"--plot {directory}: no directory {parent}"
    return None


def _plot(result: dict[str, Any], directory: str) -> None:
    from .plot import write_plots

    for path in write_plots(result, directory):
        print(f"wrote {path}", file=sys.stderr)


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.plot:
        why = _plot_dir_problem(args.plot)
        if why is not None:
            print(f"workerbus bench: {why}", file=sys.stderr)
            return 2
    if args.list:
        for name in PEERS:
            peer = make_peer(name)
            why = peer.unavailable()
            print(f"{name:26s} {'NOT AVAILABLE: ' + why if why else peer.describe()}")
        print(f"{_SUBSET:26s} {SUBSET_DESCRIPTION}")
        return 0
    if args.from_json:
        try:
            with open(args.from_json) as f:
                saved = json.load(f)
            report = text_report(saved)
        except (OSError, ValueError) as exc:
            print(f"workerbus bench: --from-json {args.from_json}: {exc}", file=sys.stderr)
            return 2
        except (KeyError, TypeError, AttributeError, IndexError) as exc:
            print(f"workerbus bench: --from-json {args.from_json}: not a saved workerbus bench "
                  f"result ({type(exc).__name__}: {exc})", file=sys.stderr)
            return 2
        print(report)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(markdown(saved))
        if args.plot:
            _plot(saved, args.plot)
        return 0
    s, seed = settings_from_args(args)
    # SIGTERM unwinds like Ctrl-C, so every run's finally block stops what it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    # One progress line over every run, the seed experiment's included (terminal only).
    weights = [estimate_seconds(s, run) for run in plan_runs(s)]
    if s.subset:
        weights.append(s.reps * (10.0 + s.events * 20 / 400_000))
    if s.seed:
        weights += estimate_seed_seconds(seed)

    command = "workerbus bench " + shlex.join(sys.argv[2:]) if len(sys.argv) > 1 else ""
    with Progress(len(weights), weights=weights, seconds_per_weight=1.0) as progress:

        def seed_runner(_: Settings) -> dict[str, Any]:
            return run_seed(seed, log=progress.print, progress=progress)

        result = run_benchmark(s, seed_runner=seed_runner, command=command.strip(), progress=progress)
    print(text_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.json}", file=sys.stderr)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(result))
        print(f"wrote {args.markdown}", file=sys.stderr)
    if args.plot:
        _plot(result, args.plot)
    return 0
