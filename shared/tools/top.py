"""``workerbus top``: a live view of a running broker, read from its stats socket.

Every ``--interval`` seconds it fetches ``GET /stats`` (the JSON of
:mod:`shared.tools.statsserver`) and shows the workers (connected or expected, pid, queue depth,
frames delivered and dropped, and their rates) and the broker's totals. Rates are the
difference of two successive samples divided by the time between them, so ``--once`` takes
two samples ``--interval`` apart before it prints.

On a terminal the view redraws in place (with ``rich`` when it is installed, plain text
otherwise or with ``--plain``) until ``q`` or Ctrl-C; when stdout is not a terminal it
prints one plain table per interval, with no escape codes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import signal
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from shared.transport import parse_address

from .cliargs import log_level, unix_address

__all__ = ["TopError", "View", "add_parser", "build_view", "fetch_sample", "render_plain", "run_top"]

Sample = tuple[float, dict[str, Any]]  # (monotonic time, the /stats document)

# Escape sequences of the plain redrawing view: alternate screen, home + clear, cursor.
_ENTER = "\x1b[?1049h\x1b[?25l"
_LEAVE = "\x1b[?25h\x1b[?1049l"
_HOME_CLEAR = "\x1b[H\x1b[2J"


class TopError(Exception):
    """A problem the user can fix, said in one line."""


# --- fetching ----------------------------------------------------------------------------


def fetch_sample(address: str, *, timeout: float = 5.0) -> Sample:
    """Fetch ``/stats`` from the stats socket at ``address``.

    Raises:
        TopError: no socket there, nobody listening, or not a stats socket.
    """
    import httpx

    try:
        path = parse_address(address)
    except ValueError as exc:
        raise TopError(str(exc)) from None
    hint = f"(start the broker with --stats-listen unix:{path})"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise TopError(f"no stats socket at {path} {hint}") from None
    except OSError as exc:
        raise TopError(f"cannot reach {path}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(mode):
        raise TopError(f"{path} is not a socket {hint}")
    not_stats = (f"{path} does not answer like a stats socket (is it the bus socket? "
                 "give the path of the broker's --stats-listen)")  # fmt: skip
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=path), timeout=timeout) as client:
            response = client.get("http://workerbus/stats")
    except httpx.ConnectError as exc:
        cause = exc.__context__ or exc.__cause__
        if isinstance(cause, PermissionError) or "Permission denied" in str(exc):
            raise TopError(f"permission denied on {path} (run as the broker's user)") from None
        raise TopError(f"nothing listens on {path} (is the broker running?)") from None
    except httpx.TimeoutException:
        raise TopError(f"{path} did not answer within {timeout:g} s; {not_stats}") from None
    except httpx.HTTPError:
        raise TopError(not_stats) from None
    try:
        doc = response.json() if response.status_code == 200 else None
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("router"), dict):
        raise TopError(not_stats)
    return time.monotonic(), doc


# --- the model of one screen -------------------------------------------------------------


@dataclass(frozen=True)
class WorkerRow:
    worker_id: int
    pid: int | None
    #: connected | absent (an expected id with no connection) | leaving (queue in its grace)
    state: str
    depth: int
    delivered: int
    delivered_per_s: float | None
    dropped: int
    dropped_per_s: float | None


@dataclass(frozen=True)
class Total:
    name: str
    value: int
    per_s: float | None


@dataclass(frozen=True)
class View:
    address: str
    broker_pid: int | None
    #: seconds between the two samples the rates come from (None: one sample only)
    span: float | None
    expected: int
    connected: int
    totals: list[Total]
    connections: str
    rss_bytes: int | None
    rows: list[WorkerRow] = field(default_factory=list)


def _rate(now: int, before: int | None, span: float | None) -> float | None:
    # A counter that went down means the broker restarted between the samples.
    if before is None or span is None or span <= 0 or now < before:
        return None
    return (now - before) / span


def build_view(address: str, current: Sample, previous: Sample | None = None) -> View:
    """What one screen shows; rates where ``previous`` has the same counter."""
    now_t, doc = current
    before = previous[1] if previous else {}
    span = now_t - previous[0] if previous else None
    router, prev_router = doc["router"], before.get("router", {})
    expected = int(doc.get("expected_workers", 0))
    pids = {w["worker_id"]: w["pid"] for w in doc.get("workers", [])}
    prev_queues = {q["worker_id"]: q for q in prev_router.get("queues", [])}
    rows = []
    for q in router["queues"]:
        wid = q["worker_id"]
        pq = prev_queues.get(wid, {})
        if q["connected"]:
            state = "connected"
        else:
            state = "absent" if 0 <= wid < expected else "leaving"
        rows.append(WorkerRow(
            worker_id=wid, pid=pids.get(wid), state=state, depth=q["depth"],
            delivered=q["sent"], delivered_per_s=_rate(q["sent"], pq.get("sent"), span),
            dropped=q["dropped"], dropped_per_s=_rate(q["dropped"], pq.get("dropped"), span),
        ))  # fmt: skip
    totals = [
        Total(label, int(router.get(key, 0)), _rate(int(router.get(key, 0)), prev_router.get(key), span))
        for label, key in (("publishes", "publishes"), ("delivered", "sent"), ("dropped", "dropped"))
    ]
    totals.append(Total("queued", int(router.get("queued", 0)), None))
    totals.append(Total("unroutable", int(router.get("unroutable", 0)), None))
    connections = (
        f"{doc.get('open_connections', 0)} open, "
        f"{doc.get('accepted', 0)} accepted, {doc.get('refused', 0)} refused"
    )
    memory = doc.get("process_memory") or {}
    return View(
        address=address, broker_pid=doc.get("pid") or None, span=span, expected=expected,
        connected=sum(1 for r in rows if r.state == "connected"), totals=totals,
        connections=connections, rss_bytes=memory.get("rss"), rows=rows,
    )  # fmt: skip


# --- rendering ---------------------------------------------------------------------------


def _n(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def _title(view: View) -> str:
    pid = f"pid {view.broker_pid}" if view.broker_pid else "pid ?"
    rates = f"rates over {view.span:.1f} s" if view.span else "rates after the next sample"
    return f"workerbus broker {pid} at {view.address}, {rates}"


def _summary_lines(view: View) -> list[str]:
    expected = f", {view.expected} expected" if view.expected else ""
    rss = f", broker RSS {view.rss_bytes / 2**20:.1f} MiB" if view.rss_bytes else ""
    totals = "  ".join(
        f"{t.name} {_n(t.value)}" + ("" if t.per_s is None and t.name in ("queued", "unroutable")
                                     else f" ({_n(t.per_s)}/s)")
        for t in view.totals
    )
    return [
        f"workers: {view.connected} connected{expected}; connections: {view.connections}{rss}",
        f"totals: {totals}",
    ]


_HEAD = ("WORKER", "PID", "STATE", "QUEUE", "DELIVERED", "DELIVERED/S", "DROPPED", "DROPPED/S")


def _cells(row: WorkerRow) -> tuple[str, ...]:
    return (str(row.worker_id), "–" if row.pid is None else str(row.pid), row.state, _n(row.depth),
            _n(row.delivered), _n(row.delivered_per_s), _n(row.dropped), _n(row.dropped_per_s))  # fmt: skip


def render_plain(view: View) -> list[str]:
    """The view as plain lines (no escape codes): the ``--once`` output."""
    table = [_HEAD, *(_cells(r) for r in view.rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(_HEAD))]

    def line(cells: tuple[str, ...]) -> str:
        # id, pid and state read left to right; the numbers align on the right
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    lines = [_title(view), *_summary_lines(view), "", line(_HEAD)]
    lines += [line(c) for c in table[1:]] or ["(no worker queues)"]
    return lines


def _render_rich(view: View) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(expand=False, header_style="bold", box=None, pad_edge=False)
    for i, name in enumerate(_HEAD):
        table.add_column(name, justify="left" if i < 3 else "right")
    colours = {"connected": "green", "absent": "red", "leaving": "yellow"}
    for row in view.rows:
        cells = list(_cells(row))
        cells[2] = f"[{colours[row.state]}]{row.state}[/]"
        if row.dropped:
            cells[6] = f"[red]{cells[6]}[/]"
        table.add_row(*cells)
    head = Text(_title(view), style="bold")
    lines = [Text(s) for s in _summary_lines(view)]
    return Group(head, *lines, Text(""), table, Text(""), Text("q or Ctrl-C quits", style="dim"))


# --- running -----------------------------------------------------------------------------


@contextlib.contextmanager
def _keys() -> Iterator[Callable[[float], str]]:
    """A function that waits up to N seconds for a key on a terminal stdin ('' if none)."""
    fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
    if fd is None:
        def wait_only(seconds: float) -> str:
            time.sleep(seconds)
            return ""

        yield wait_only
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)  # keys without Enter; Ctrl-C still raises KeyboardInterrupt

    def wait_key(seconds: float) -> str:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                return os.read(fd, 32).decode("utf-8", "replace")
        return ""

    try:
        yield wait_key
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _rich_available() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def run_top(address: str, *, interval: float = 1.0, once: bool = False, plain: bool = False,
            out: TextIO | None = None) -> int:  # fmt: skip
    """The ``workerbus top`` command; returns the exit status."""
    out = out or sys.stdout
    previous = fetch_sample(address)
    if once:
        time.sleep(interval)
        out.write("\n".join(render_plain(build_view(address, fetch_sample(address), previous))) + "\n")
        return 0
    # SIGTERM unwinds like Ctrl-C, so the terminal is restored either way.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    live = out.isatty() and os.environ.get("TERM") != "dumb"
    if not live:
        return _run_lines(address, previous, interval, out)
    if not plain and _rich_available():
        return _run_rich(address, previous, interval, out)
    return _run_plain_screen(address, previous, interval, out)


def _run_lines(address: str, previous: Sample, interval: float, out: TextIO) -> int:
    """Not a terminal: one plain table per interval, separated by a blank line."""
    try:
        while True:
            time.sleep(interval)
            current = fetch_sample(address)
            out.write("\n".join(render_plain(build_view(address, current, previous))) + "\n\n")
            out.flush()
            previous = current
    except KeyboardInterrupt:
        return 0


def _run_plain_screen(address: str, previous: Sample, interval: float, out: TextIO) -> int:
    out.write(_ENTER)
    try:
        with _keys() as wait_key:
            current = previous
            view = build_view(address, current)
            while True:
                width, height = shutil.get_terminal_size()
                lines = [*render_plain(view), "", "q or Ctrl-C quits"]
                out.write(_HOME_CLEAR + "\n".join(s[:width] for s in lines[:height]))
                out.flush()
                if "q" in wait_key(interval).lower():
                    return 0
                previous, current = current, fetch_sample(address)
                view = build_view(address, current, previous)
    except KeyboardInterrupt:
        return 0
    finally:
        out.write(_LEAVE)
        out.flush()


def _run_rich(address: str, previous: Sample, interval: float, out: TextIO) -> int:
    from rich.console import Console
    from rich.live import Live

    console = Console(file=out)
    try:
        with _keys() as wait_key, Live(console=console, screen=True, auto_refresh=False) as live:
            current = previous
            view = build_view(address, current)
            while True:
                live.update(_render_rich(view), refresh=True)
                if "q" in wait_key(interval).lower():
                    return 0
                previous, current = current, fetch_sample(address)
                view = build_view(address, current, previous)
    except KeyboardInterrupt:
        return 0


# --- the command line --------------------------------------------------------------------


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0.05 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be within 0.05..3600 seconds, got {text}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``top`` on the ``workerbus`` command's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "top",
        help="a live view of a running broker (from its --stats-listen socket)",
        description="Workers, queues, deliveries and drops of a running broker, refreshed "
                    "in place like htop; q or Ctrl-C quits.",
    )  # fmt: skip
    p.add_argument("address", type=unix_address, metavar="unix:STATS-PATH",
                   help="the broker's --stats-listen socket")
    p.add_argument("--interval", type=_interval, default=1.0, metavar="SECONDS",
                   help="seconds between samples; rates are over this span (default 1)")
    p.add_argument("--once", action="store_true",
                   help="print one snapshot as a plain table (two samples --interval apart) and exit "
                        "(default: refresh until q)")
    p.add_argument("--plain", action="store_true",
                   help="plain text even when rich is installed (default: rich on a terminal)")
    p.add_argument("--log-level", type=log_level, default="WARNING", metavar="LEVEL",
                   help="log to stderr from this level on (default %(default)s)")
    p.set_defaults(func=_cmd_top)
    return p


def _cmd_top(args: argparse.Namespace) -> int:
    try:
        return run_top(args.address, interval=args.interval, once=args.once, plain=args.plain)
    except TopError as exc:
        sys.stderr.write(f"workerbus top: {exc}\n")
        return 1

