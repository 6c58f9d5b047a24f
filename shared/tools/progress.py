"""One updating progress line with the time left, for long commands on a terminal.

``workerbus bench`` and ``workerbus conformance broker`` run for minutes. On a terminal they
show, on stderr, one line that is redrawn in place::

    [12/35] case broadcast.order … ~40 s left

When stderr is not a terminal (piped, redirected, CI) a :class:`Progress` draws nothing at
all, so logs stay line-oriented: no carriage returns, no escape codes. Other output goes
through :meth:`Progress.print`, which takes the line away, prints, and puts it back, so the
two never mix on one terminal line.

The estimate weighs the items: each has a weight (by default 1; the bench passes its guess
of seconds), and the time left is the remaining weight at the speed measured so far, which
a background thread counts down once a second while an item runs.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TextIO

__all__ = ["Progress", "format_left", "is_terminal"]

_CLEAR = "\r\x1b[K"


def is_terminal(stream: TextIO) -> bool:
    """True when ``stream`` is an interactive terminal that understands ``\\r`` and ``ESC[K``."""
    try:
        return stream.isatty() and os.environ.get("TERM", "") != "dumb"
    except (AttributeError, ValueError):  # closed or not a real file
        return False


def format_left(seconds: float) -> str:
    """``~40 s left``, ``~3 min left``, ``~1 h 05 min left``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"~{s} s left"
    if s < 3600:
        return f"~{round(s / 60)} min left"
    return f"~{s // 3600} h {s % 3600 // 60:02d} min left"


class Progress:
    """Progress over ``total`` items, drawn on ``stream`` only when it is a terminal.

    Args:
        total: items to be done.
        stream: where the line goes (default stderr).
        weights: the relative cost of each item, in order (default: all equal).
        seconds_per_weight: a guess used before the first item finishes (None: no
            estimate until then).
        enabled: force drawing on or off (default: whether ``stream`` is a terminal).
        tick: seconds between redraws while an item runs.
    """

    def __init__(
        self,
        total: int,
        *,
        stream: TextIO | None = None,
        weights: Sequence[float] | None = None,
        seconds_per_weight: float | None = None,
        enabled: bool | None = None,
        tick: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = is_terminal(self.stream) if enabled is None else enabled
        self.total = total
        self.weights = list(weights) if weights is not None else [1.0] * total
        if len(self.weights) != total:
            raise ValueError("weights must have one entry per item")
        self.guess = seconds_per_weight
        self.tick = tick
        self.clock = clock
        self.index = 0  # items started
        self.label = ""
        self.done_weight = 0.0
        self.done_seconds = 0.0
        self.item_started = clock()
        self._shown = False
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    # --- the estimate --------------------------------------------------------------------

    def seconds_left(self) -> float | None:
        """Remaining weight at the speed so far, minus what the current item already took."""
        if self.done_weight > 0:
            per_weight = self.done_seconds / self.done_weight
        elif self.guess is not None:
            per_weight = self.guess
        else:
            return None
        current = self.weights[self.index - 1] if 0 < self.index <= self.total else 0.0
        after = sum(self.weights[self.index :])
        in_current = max(0.0, per_weight * current - (self.clock() - self.item_started))
        return per_weight * after + in_current

    def line(self) -> str:
        if self.index == 0:
            return self.label  # a note before the first item (see note())
        left = self.seconds_left()
        estimate = "estimating time left" if left is None else format_left(left)
        return f"[{self.index}/{self.total}] {self.label} … {estimate}"

    # --- items ---------------------------------------------------------------------------

    def note(self, text: str) -> None:
        """Show ``text`` before the first item starts (e.g. a wait); terminal only."""
        with self._lock:
            if self.index == 0:
                self.label = text
                self._draw()

    def start(self, label: str) -> None:
        """The next item begins."""
        with self._lock:
            self.index = min(self.index + 1, self.total)
            self.label = label
            self.item_started = self.clock()
            self._draw()

    def done(self) -> None:
        """The current item finished."""
        with self._lock:
            if 0 < self.index <= self.total:
                self.done_weight += self.weights[self.index - 1]
                self.done_seconds += self.clock() - self.item_started
            # no redraw: the caller prints the item's result next, or starts the next one

    # --- drawing -------------------------------------------------------------------------

    def _width(self) -> int:
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
        # A pty nobody sized (e.g. under `script`) reports 0 columns.
        return columns if columns >= 20 else shutil.get_terminal_size((80, 24)).columns

    def _draw(self) -> None:
        if not self.enabled or not self.label:
            return
        # One column short of the width: a full line would wrap on some terminals.
        self.stream.write(_CLEAR + self.line()[: max(10, self._width() - 1)])
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        """Take the line away (before other output; the next draw puts it back)."""
        with self._lock:
            if self._shown:
                self.stream.write(_CLEAR)
                self.stream.flush()
                self._shown = False

    def print(self, text: str, file: TextIO | None = None) -> None:
        """Print a line of other output without mixing it into the progress line."""
        with self._lock:
            self.clear()
            out = file if file is not None else self.stream
            out.write(text + "\n")
            out.flush()
            self._draw()

    # --- lifetime ------------------------------------------------------------------------

    def _run_ticker(self) -> None:
        while not self._stop.wait(self.tick):
            with self._lock:
                self._draw()

    def __enter__(self) -> Progress:
        if self.enabled:
            self._ticker = threading.Thread(target=self._run_ticker, name="progress", daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        self.clear()
