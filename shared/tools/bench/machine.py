"""The machine and software a benchmark ran on, for the report."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import subprocess
from importlib import metadata
from typing import Any

from shared import compiled

__all__ = ["describe_machine"]

_PACKAGES = ("workerbus", "anyio", "trio", "msgpack", "uvloop", "pyzmq", "redis", "hiredis", "uvicorn", "h11")


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "n/a"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else "n/a"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1048576, 1)
    except OSError:
        pass
    return 0.0


def describe_machine() -> dict[str, Any]:
    versions: dict[str, str] = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    redis = shutil.which("redis-server")
    wrk = shutil.which("wrk")
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "mem_gib": _mem_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        # the optional mypyc build (docs/compiled.md): figures of the two never mix
        "compiled": compiled.summary(),
        "packages": versions,
        "redis_server": _first_line([redis, "--version"]).split(" sha=")[0] if redis else "not installed",
        "wrk": _first_line([wrk, "--version"]).split(" [")[0] if wrk else "not installed",
    }
