"""What the kernel says about CPU and memory: /proc readers for the benchmark.

CPU comes from the scheduler's nanosecond counters (``/proc/<pid>/task/*/schedstat``: time
on CPU, user and system together, every thread), which are far finer than the 10 ms ticks
of ``/proc/<pid>/stat``; the ticks are the fallback when schedstat is missing. The machine
totals from ``/proc/stat`` tell how much CPU processes *outside* a run used meanwhile, so a
run disturbed by other work can be recognised and measured again.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

__all__ = [
    "MachineSample",
    "background_share",
    "children_of",
    "cpu_seconds",
    "machine_sample",
    "peak_rss_kib",
    "user_system_seconds",
    "wait_until_idle",
]

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU time used so far by every thread of ``pid``, in seconds; 0.0 once it is gone."""
    total = 0
    found = False
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
                found = True
        except (OSError, ValueError, IndexError):
            continue
    if found:
        return total / 1e9
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return 0.0
    # Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def user_system_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid`` from its 10 ms ticks; (0, 0) once it is gone.

    Coarser than :func:`cpu_seconds`, but it tells Python work from time in the kernel.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return 0.0, 0.0
    fields = raw[raw.rindex(b")") + 2 :].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def peak_rss_kib(pid: int) -> int:
    """``VmHWM`` (peak resident set) of ``pid`` in KiB; 0 when unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (e.g. the worker processes of a uvicorn master)."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except OSError:
            continue
    return out


@dataclass(frozen=True, slots=True)
class MachineSample:
    """Machine-wide CPU counters at one instant (seconds, summed over all CPUs)."""

    busy: float
    steal: float
    at: float


def machine_sample() -> MachineSample:
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return MachineSample((user + nice + system + irq + softirq) / _TICK, steal / _TICK, time.monotonic())


def background_share(
    before: MachineSample, after: MachineSample, own_cpu: float
) -> tuple[float, float]:
    """(% of the machine used by others, % stolen by the hypervisor) between two samples.

    ``own_cpu`` is the CPU the measured processes used meanwhile; the rest of the machine's
    busy time belongs to somebody else.
    """
    capacity = max(after.at - before.at, 1e-3) * (os.cpu_count() or 1)
    others = max(0.0, (after.busy - before.busy) - own_cpu)
    return 100 * others / capacity, 100 * (after.steal - before.steal) / capacity


def wait_until_idle(limit: float, threshold: float = 10.0, probe: float = 1.0) -> float:
    """Wait up to ``limit`` seconds for the machine to be quiet; return the last busy %.

    The caller is idle meanwhile, so all busy time measured is somebody else's.
    """
    deadline = time.monotonic() + limit
    while True:
        a = machine_sample()
        time.sleep(probe)
        b = machine_sample()
        pct, _ = background_share(a, b, 0.0)
        if pct <= threshold or time.monotonic() >= deadline:
            return round(pct, 1)
