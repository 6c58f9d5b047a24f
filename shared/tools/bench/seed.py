"""The seed experiment, redone: an HTTP server under load while its workers post events.

Kong measured lua-resty-events against lua-resty-worker-events (shared memory, polled) by
loading nginx with HTTP traffic while every worker posted events in bursts: 1000 events per
0.5 s, and 10 000 per 0.1 s. Here W uvicorn processes serve :mod:`shared.tools.bench.seedapp`
on one 127.0.0.1 port (``SO_REUSEPORT``, see :mod:`.seedserve`), ``wrk`` loads it for a
fixed time, and every worker posts its bursts through workerbus (a broker process, as the
``workerbus broker`` command runs it), through workerbus embedded in the workers
(:func:`shared.embed.join`: one worker hosts the broker, like lua-resty-events), through the
shared-memory poller, or not at all (the baseline). The default storms are the seed's
scaled by 1/10 per worker, because this runs W = 2 workers on 2 cores (``--seed-storms``
changes them).

Reported per storm and route: requests/s and the HTTP latency percentiles from ``wrk``,
CPU of the server's processes (uvicorn master and workers, and the broker), events
published and handled per second, and the delay from posting an event to handling it.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from shared.tools.progress import Progress

from . import procfs
from .fanout import percentile
from .peers.base import spawn, stopper, wait_for_socket
from .peers.shmring import ring_size

__all__ = ["SeedSettings", "Storm", "parse_storms", "run_seed"]


@dataclass(frozen=True)
class Storm:
    name: str
    #: events posted per burst, per worker
    burst: int
    #: seconds between bursts
    every: float

    @property
    def label(self) -> str:
        return f"{self.name}: {self.burst} per {self.every:g} s per worker"


def parse_storms(text: str) -> list[Storm]:
    """``light=100/0.5,heavy=1000/0.1`` → storms (events per burst / seconds between)."""
    storms = []
    for part in text.split(","):
        name, _, spec = part.partition("=")
        burst, _, every = spec.partition("/")
        storms.append(Storm(name.strip(), int(burst), float(every)))
    return storms


@dataclass
class SeedSettings:
    workers: int = 2
    duration: float = 5.0
    connections: int = 32
    reps: int = 5
    storms: list[Storm] = field(
        default_factory=lambda: [Storm("light", 100, 0.5), Storm("heavy", 1000, 0.1)]
    )
    transport: str = "stream"
    backend: str = "uvloop"
    poll: float = 0.010
    warmup: float = 1.0
    timeout: float = 60.0

    def describe(self) -> dict[str, Any]:
        return {
            "workers": self.workers, "duration_s": self.duration, "connections": self.connections,
            "reps": self.reps, "storms": [s.label for s in self.storms], "transport": self.transport,
            "broker_backend": self.backend, "poll_interval_s": self.poll, "warmup_s": self.warmup,
        }  # fmt: skip


def unavailable() -> str | None:
    if shutil.which("wrk") is None:
        return "wrk is not installed (apt-get install wrk)"
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        return "uvicorn is not installed (pip install 'workerbus[servers]')"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"cannot read wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    """Requests/s, latency percentiles (ms) and errors from ``wrk --latency`` output."""
    rps = re.search(r"Requests/sec:\s*([\d.]+)", out)
    if not rps:
        raise ValueError(f"no Requests/sec in wrk output:\n{out}")
    res: dict[str, Any] = {"requests_per_s": float(rps.group(1))}
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s*{pct}%\s+(\S+)", out, re.M)
        if m:
            res[f"latency_p{pct}_ms"] = round(_ms(m.group(1)), 3)
    total = re.search(r"(\d+) requests in", out)
    res["requests"] = int(total.group(1)) if total else None
    errors = re.search(r"Socket errors: (.*)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["errors"] = (errors.group(1) if errors else "") + (f" non-2xx {non2xx.group(1)}" if non2xx else "")
    return res


def _read_counts(workdir: str) -> tuple[int, int]:
    published = received = 0
    for name in os.listdir(workdir):
        if name.startswith("count-"):
            try:
                with open(os.path.join(workdir, name)) as f:
                    a, b = f.read().split()
            except (OSError, ValueError):
                continue
            published += int(a)
            received += int(b)
    return published, received


def _wait(cond: Any, deadline: float, what: str) -> None:
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _http_up(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


#: The routes events take in the experiment, in run order; "none" is the baseline.
ROUTES = ("workerbus", "workerbus-embedded", "shm-poll")


def run_once(s: SeedSettings, mode: str, storm: Storm | None) -> dict[str, Any]:
    """One measured window of ``s.duration`` seconds."""
    base: dict[str, Any] = {"mode": mode, "storm": storm.name if storm else None}
    workdir = tempfile.mkdtemp(prefix="wbseed-", dir="/tmp")
    shm_path = None
    broker = None
    servers: list[subprocess.Popen[bytes]] = []
    deadline = time.monotonic() + s.timeout
    try:
        env = dict(os.environ, WB_SEED_MODE=mode, WB_SEED_DIR=workdir, WB_SEED_WORKERS=str(s.workers),
                   WB_SEED_BURST=str(storm.burst if storm else 0),
                   WB_SEED_EVERY=str(storm.every if storm else 1))  # fmt: skip
        broker_pids: list[int] = []
        address = f"unix:{os.path.join(workdir, 'bus.sock')}"
        env.update(WB_SEED_ADDRESS=address, WB_SEED_TRANSPORT=s.transport)
        if mode == "workerbus":
            argv = [sys.executable, "-m", "shared.tools.cli", "broker", "--listen", address,
                    "--transport", s.transport, "--backend", s.backend, "--log-level", "WARNING"]  # fmt: skip
            proc = spawn(argv)
            broker = stopper(proc)
            wait_for_socket(address[len("unix:") :], proc)
            broker_pids = [proc.pid]
        elif mode == "shm-poll":
            shm_path = tempfile.mktemp(prefix="wbseed-ring-", dir="/dev/shm")
            with open(shm_path, "wb") as ring:
                ring.truncate(ring_size())
            env.update(WB_SEED_SHM=shm_path, WB_SEED_POLL=str(s.poll))
        port = _free_port()
        for _ in range(s.workers):  # one by one: each is stopped in `finally` if a later one fails
            servers.append(subprocess.Popen(  # noqa: PERF401
                [sys.executable, "-m", "shared.tools.bench.seedserve", str(port)], env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True,
            ))  # fmt: skip

        def ready() -> bool:
            for server in servers:
                if server.poll() is not None:
                    raise RuntimeError(f"a server process exited with status {server.returncode}")
            n = sum(1 for f in os.listdir(workdir) if f.startswith("ready-"))
            return n >= s.workers and _http_up(port)

        _wait(ready, deadline, "the server processes to start")
        time.sleep(s.warmup)
        server_pids = [p.pid for p in servers]
        pids = broker_pids + server_pids
        cpu0 = {p: procfs.cpu_seconds(p) for p in pids}
        m0 = procfs.machine_sample()
        c0 = _read_counts(workdir)
        wrk_cpu0 = _children_cpu()
        t0 = time.monotonic()
        wrk = subprocess.run(
            ["wrk", "-t1", f"-c{s.connections}", f"-d{s.duration:g}s", "--latency", f"http://127.0.0.1:{port}/"],
            capture_output=True, text=True, timeout=s.duration + 30, check=False,
        )  # fmt: skip
        t1 = time.monotonic()
        used = {p: procfs.cpu_seconds(p) - cpu0[p] for p in pids}
        m1 = procfs.machine_sample()
        c1 = _read_counts(workdir)
        # wrk is the only child reaped meanwhile, so the children's usage delta is its CPU.
        wrk_cpu = _children_cpu() - wrk_cpu0
        if wrk.returncode != 0:
            raise RuntimeError(f"wrk failed ({wrk.returncode}): {wrk.stderr.strip()}")
        res = {**base, "ok": True, **parse_wrk(wrk.stdout)}
        window = t1 - t0
        cpu = sum(used.values())
        per_server = [used[p] for p in server_pids]
        res.update(
            cpu_s=round(cpu, 2),
            cpu_pct=round(100 * cpu / (window * (os.cpu_count() or 1)), 1),
            broker_cpu_s=round(sum(used[p] for p in broker_pids), 2) if broker_pids else None,
            # how evenly the kernel spread the load: least busy server / busiest
            server_balance=round(min(per_server) / max(per_server), 2) if max(per_server) > 0 else None,
            published_per_s=round((c1[0] - c0[0]) / window, 1),
            received_per_s=round((c1[1] - c0[1]) / window, 1),
            window_s=round(window, 2),
            wrk_cpu_s=round(wrk_cpu, 2),
        )
        bg, steal = procfs.background_share(m0, m1, cpu + wrk_cpu)
        res["background_cpu_pct"] = round(bg, 1)
        res["steal_pct"] = round(steal, 1)
        # Graceful stop so every server writes its final report (event delays).
        for server in servers:
            server.send_signal(signal.SIGTERM)
        for server in servers:
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        delays: list[int] = []
        for name in os.listdir(workdir):
            if name.startswith("final-"):
                with open(os.path.join(workdir, name)) as f:
                    delays += json.load(f)["delays_us"]
        if delays:
            delays.sort()
            res["event_delay_p50_ms"] = round(percentile(delays, 0.50) / 1e3, 3)
            res["event_delay_p99_ms"] = round(percentile(delays, 0.99) / 1e3, 3)
        return res
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
        return {**base, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        for server in servers:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
        for server in servers:
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            try:  # its own process group: leave nothing of it behind
                os.killpg(server.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if server.poll() is None:
                server.wait(timeout=5)
        if broker is not None:
            broker()
        if shm_path is not None:
            try:
                os.unlink(shm_path)
            except FileNotFoundError:
                pass
        shutil.rmtree(workdir, ignore_errors=True)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _median(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if r.get("ok")]
    out = {k: v for k, v in rows[0].items() if k not in ("ok", "error")}
    out["runs_ok"], out["runs"] = len(ok), len(rows)
    if not ok:
        return {**out, "ok": False, "error": rows[-1].get("error")}
    for key in set().union(*(r.keys() for r in ok)):
        values = [r[key] for r in ok if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        if values:
            out[key] = statistics.median(values)
    out["ok"] = True
    return out


def _paired(runs: list[dict[str, Any]], storm: str) -> dict[str, dict[str, float | None]]:
    """Ratios between runs of the same repetition, then their median over repetitions.

    This machine's speed drifts between repetitions (a whole repetition can run 30 %
    slower), while runs next to each other see about the same machine; so a route is
    compared with the baseline and the poller of its own repetition.
    """
    by_rep: dict[int, dict[str, dict[str, Any]]] = {}
    for r in runs:
        if r.get("ok") and r["storm"] in (storm, None):
            by_rep.setdefault(r["rep"], {})[r["mode"]] = r
    out: dict[str, dict[str, float | None]] = {}
    for route in ROUTES:
        ratios: dict[str, list[float]] = {"rps_vs_none": [], "rps_vs_shm": [], "p99_vs_shm": [], "p90_vs_shm": []}
        for rep in by_rep.values():
            mine, none, shm = rep.get(route), rep.get("none"), rep.get("shm-poll")
            if mine and none:
                ratios["rps_vs_none"].append(mine["requests_per_s"] / none["requests_per_s"])
            if mine and shm and route != "shm-poll":
                ratios["rps_vs_shm"].append(mine["requests_per_s"] / shm["requests_per_s"])
                ratios["p99_vs_shm"].append(mine["latency_p99_ms"] / shm["latency_p99_ms"])
                ratios["p90_vs_shm"].append(mine["latency_p90_ms"] / shm["latency_p90_ms"])
        out[route] = {k: round(statistics.median(v), 3) if v else None for k, v in ratios.items()}
    return out


def seed_plan(s: SeedSettings) -> list[tuple[str, Storm | None]]:
    """The runs of one repetition: the baseline, then every storm × route."""
    return [("none", None), *((mode, storm) for storm in s.storms for mode in ROUTES)]


def estimate_seed_seconds(s: SeedSettings) -> list[float]:
    """A guess of each run's wall time (for the progress line's time left only)."""
    # ~3 s to start uvicorn, the broker and the publishers, then warm-up and wrk
    return [3.0 + s.warmup + s.duration] * (len(seed_plan(s)) * s.reps)


def run_seed(s: SeedSettings, log: Any = None, progress: Progress | None = None) -> dict[str, Any]:
    """Every storm × route, ``s.reps`` times interleaved; medians per (storm, route)."""
    why = unavailable()
    if why:
        return {"settings": s.describe(), "unavailable": why, "storms": [], "baseline": {"ok": False, "error": why}}
    runs: list[dict[str, Any]] = []
    for rep in range(s.reps):
        for mode, storm in seed_plan(s):
            if progress is not None:
                progress.start(f"seed {mode} {storm.name if storm else 'no events'} (rep {rep + 1}/{s.reps})")
            r = run_once(s, mode, storm)
            if progress is not None:
                progress.done()
            r["rep"] = rep
            runs.append(r)
            if log is not None:
                what = f"seed {mode:9s} {storm.label if storm else 'no events':42s}"
                if r.get("ok"):
                    log(f"{what} {r['requests_per_s']:>9,.0f} req/s  p99 {r.get('latency_p99_ms', 0):6.2f} ms  "
                        f"CPU {r['cpu_pct']:3.0f}%  events {r['received_per_s']:>8,.0f}/s")  # fmt: skip
                else:
                    log(f"{what} FAILED: {r.get('error')}")
    baseline = _median([r for r in runs if r["mode"] == "none"])
    storms = []
    for storm in s.storms:
        rows = [_median([r for r in runs if r["mode"] == mode and r["storm"] == storm.name])
                for mode in ROUTES]  # fmt: skip
        storms.append({"name": storm.name, "label": storm.label, "rows": rows,
                       "paired": _paired(runs, storm.name)})  # fmt: skip
    return {
        "settings": s.describe(),
        "heavy": max(s.storms, key=lambda st: st.burst / st.every).name if s.storms else None,
        "baseline": baseline,
        "storms": storms,
        "runs": runs,
    }
