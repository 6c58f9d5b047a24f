"""Rate limiting for log lines that a misbehaving peer (or a dead broker) can repeat at will.

A reconnect storm or a flood of garbage connections must not turn into a flood of log
lines: the first few lines of one kind per interval go through, the rest are counted, and
the count is logged once the interval is over ("... 412 similar lines suppressed").

"One kind" is the format string (or an explicit key), never the formatted text: the same
error from a hundred different pids is one kind.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["DEFAULT_LOG_BURST", "DEFAULT_LOG_INTERVAL", "LogLimiter", "reason"]

#: Lines of one kind logged per interval before the rest are only counted.
DEFAULT_LOG_BURST = 5
#: Seconds of one rate-limiting window.
DEFAULT_LOG_INTERVAL = 10.0
#: Kinds remembered at once; kinds are format strings, so a handful in practice. The cap
#: only guards against a caller that passes formatted text as the key.
_MAX_KINDS = 256


def reason(exc: BaseException) -> str:
    """An exception as a log line's reason: its text, or its repr when the text is empty
    (``str(TimeoutError())`` is ``""``, which made lines like "cannot reach ...:  ")."""
    text = str(exc)
    return text if text.strip() else repr(exc)


def _format(msg: str, args: tuple[object, ...]) -> str:
    try:
        return msg % args if args else msg
    except (TypeError, ValueError):
        return f"{msg} {args!r}"


class _Window:
    __slots__ = ("last", "level", "logged", "start", "suppressed")

    def __init__(self, start: float, level: int) -> None:
        self.start = start
        self.level = level
        self.logged = 0
        self.suppressed = 0
        #: The latest suppressed line, unformatted (formatted only if reported).
        self.last: tuple[str, tuple[object, ...]] = ("", ())


class LogLimiter:
    """Lets at most ``burst`` lines of one kind through per ``interval`` seconds.

    Args:
        logger: where the lines go.
        burst: lines of one kind per window.
        interval: window length in seconds.
        clock: injected for tests.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = DEFAULT_LOG_BURST,
        interval: float = DEFAULT_LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1:
            raise ValueError("burst must be at least 1")
        if interval <= 0:
            raise ValueError("interval must be greater than 0")
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self._clock = clock
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        #: Lines not logged so far, over all kinds (for statistics and tests).
        self.suppressed = 0

    def log(
        self, level: int, msg: str, *args: object, key: str | None = None, exc_info: bool = False
    ) -> bool:
        """Log ``msg % args`` unless this kind already used up its window; True if logged.

        ``exc_info``: add the traceback of the exception being handled (a logged line only).
        """
        kind = msg if key is None else key
        now = self._clock()
        window = self._windows.get(kind)
        if window is None or now - window.start >= self.interval:
            if window is not None:
                self._report(kind, window)
            window = _Window(now, level)
            self._windows[kind] = window
            self._windows.move_to_end(kind)
            while len(self._windows) > _MAX_KINDS:
                old_kind, old = self._windows.popitem(last=False)
                self._report(old_kind, old)
        if window.logged < self.burst:
            window.logged += 1
            self.logger.log(level, msg, *args, stacklevel=2, exc_info=exc_info)
            return True
        window.suppressed += 1
        window.last = (msg, args)
        self.suppressed += 1
        return False

    def flush(self) -> None:
        """Report the kinds whose window is over (call it now and then, e.g. once a second).

        Without it, the count of a storm that stopped would only be reported when the same
        kind of line comes again.
        """
        now = self._clock()
        for kind in [k for k, w in self._windows.items() if now - w.start >= self.interval]:
            self._report(kind, self._windows.pop(kind))

    def _report(self, kind: str, window: _Window) -> None:
        if window.suppressed:
            # The count, and the latest of them with its arguments filled in: the format
            # string alone ("dropping %s: %s") says what kind, not what happened.
            self.logger.log(
                window.level,
                "%d more lines like this suppressed in %.0f s, the latest: %s",
                window.suppressed,
                self.interval,
                _format(*window.last),
            )
