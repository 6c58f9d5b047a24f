"""Argument types and the parser class of the command line: user errors as one line.

Pure argparse, no project imports, so the conformance kit (a black box to the rest of the
project) can use it too.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import NoReturn

from shared.unixpath import socket_path

__all__ = [
    "LOG_LEVELS",
    "Parser",
    "log_level",
    "non_negative_float",
    "non_negative_int",
    "octal_mode",
    "output_file",
    "percent",
    "positive_float",
    "positive_int",
    "unix_address",
    "up_to",
    "worker_id",
]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (exit status 2).

    argparse prints the whole usage block before the error; for a command with twenty
    options that buries the one line that matters. Subparsers inherit the class.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _number(text: str, kind: type[int] | type[float]) -> float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = int(_number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(_number(text, int))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def up_to(limit: int, *, least: int = 1) -> Callable[[str], int]:
    """An integer ``least..limit``: for counts that cost memory or processes."""

    def parse(text: str) -> int:
        value = int(_number(text, int))
        if not least <= value <= limit:
            raise argparse.ArgumentTypeError(f"must be {least}..{limit}, got {text}")
        return value

    return parse


#: What a worker id must fit in: the wire carries it as a MessagePack integer.
_ID_RANGE = (-(2**63), 2**63 - 1)


def worker_id(text: str) -> int:
    value = int(_number(text, int))
    low, high = _ID_RANGE
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"a worker id must fit in a signed 64-bit integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not value > 0 or value == float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


def percent(text: str) -> float:
    value = _number(text, float)
    if not 0 < value <= 100:  # (also refuses nan)
        raise argparse.ArgumentTypeError(f"must be a percentage > 0 and <= 100, got {text}")
    return value


def output_file(text: str) -> str:
    """A file written at the end of a long run: refused now if it cannot be created there
    (no such directory, or a directory in its place), not after the run."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a directory")
    parent = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"no directory {parent}")
    if not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write into {parent}")
    return text


def octal_mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an octal file mode such as 600 or 660, got {text!r}") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"expected permission bits 000..777 (octal), got {text}")
    return value


def log_level(text: str) -> str:
    name = text.upper()
    if name not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return name


def unix_address(text: str) -> str:
    """A ``unix:/absolute/path`` that fits AF_UNIX; returned unchanged."""
    try:
        socket_path(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
