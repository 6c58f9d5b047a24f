"""The kong profile against the real thing: lua-resty-events 0.3.1 in a real nginx.

Opt-in. lua-resty-events is not packaged anywhere we can install from, and its code must not
be part of this repository, so these tests run only when ``WORKERBUS_LUA_RESTY_EVENTS``
names a directory holding ``resty/events/init.lua`` (a local copy of the library's
``lualib``), and Debian's nginx with the Lua module is installed (packages: nginx,
libnginx-mod-http-lua, lua-resty-core, lua-resty-lrucache, lua-cjson). Otherwise every test
here is skipped. See docs/kong.md for how to run them and the results.

Our nginx config and Lua glue are in tests/nginx/ (our own code). The glue subscribes one
handler to every event and compares each received value with the case named by the event,
in Lua, so a Lua-side "ok" does not depend on the Python codec under test.

- Direction A: nginx is the broker (a unix-socket server whose content handler calls
  ``ev:run()``; one nginx worker, broker_id 0). A workerbus client joins as id -1, the way
  a sidecar would, and events flow both ways, including unique.
- Direction B: nginx's workers are clients of a workerbus broker (``workerbus broker
  --profile kong``): ``listening`` points at our socket and no nginx server listens on it.
- The conformance kit is run against the real broker; its known failures are recorded.
- ``workerbus publish`` against the real broker leaves no ``[error]`` in nginx's log.

A and B, and the publish check, also run in a ``stream {}`` block (``--transport stream``)
where Debian's stream module and a stream-lua module built for this nginx are installed
(``MODULES``; Debian packages no stream-lua, see docs/kong.md §4); otherwise those variants
are skipped.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import httpx
import pytest

from shared.client import Client
from shared.frame import FrameDecoder, encode_frame
from shared.luabuf import NULL, dumps
from shared.transport import get_transport

from .helpers import Recorder
from .proc import running, wait_for_listening, wait_for_socket, workerbus

T = TypeVar("T")

LRE_ENV = "WORKERBUS_LUA_RESTY_EVENTS"
ROOT = pathlib.Path(__file__).resolve().parents[1]
GLUE = ROOT / "tests" / "nginx"
MODULES = pathlib.Path("/usr/lib/nginx/modules")
NEEDED_FILES = {
    MODULES / "ndk_http_module.so": "libnginx-mod-http-ndk",
    MODULES / "ngx_http_lua_module.so": "libnginx-mod-http-lua",
    pathlib.Path("/usr/share/lua/5.1/resty/core.lua"): "lua-resty-core",
    pathlib.Path("/usr/share/lua/5.1/resty/lrucache.lua"): "lua-resty-lrucache",
}
NGINX = shutil.which("nginx", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
#: The broker's unique window in both directions: long enough that 3 quick publishes fall in it.
UNIQUE_TIMEOUT = 2
#: The stream variants also need these dynamic modules (stream-lua is not packaged by Debian).
STREAM_MODULES = {
    MODULES / "ngx_stream_module.so": "Debian package libnginx-mod-stream",
    MODULES / "ngx_stream_lua_module.so": "stream-lua-nginx-module built for this nginx (docs/kong.md §4)",
}


def _why_skip() -> str | None:
    lre = os.environ.get(LRE_ENV)
    if not lre:
        return f"opt-in: set {LRE_ENV} to a lua-resty-events lualib directory (see docs/kong.md)"
    if not (pathlib.Path(lre) / "resty" / "events" / "init.lua").is_file():
        return f"{LRE_ENV}={lre} has no resty/events/init.lua"
    if NGINX is None:
        return "nginx is not installed (Debian package nginx)"
    missing = sorted({pkg for path, pkg in NEEDED_FILES.items() if not path.exists()})
    if not list(pathlib.Path("/usr/lib").glob("*/lua/5.1/cjson.so")):
        missing.append("lua-cjson")
    if missing:
        return f"missing Debian packages: {', '.join(missing)}"
    return None


def _why_skip_stream() -> str | None:
    missing = [what for path, what in STREAM_MODULES.items() if not path.exists()]
    return f"the stream variant needs {'; '.join(missing)}" if missing else None


SKIP_REASON = _why_skip()
STREAM_SKIP_REASON = _why_skip_stream()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")]

#: The nginx subsystem, which is also our transport: http {} -> http, stream {} -> stream.
SUBSYSTEMS = [
    "http",
    pytest.param("stream", marks=pytest.mark.skipif(STREAM_SKIP_REASON is not None,
                                                    reason=STREAM_SKIP_REASON or "")),
]


# --- the cases ---------------------------------------------------------------------------
# The same names as CASES in tests/nginx/lualib/wbglue.lua. Each value is what Python
# publishes, and also what Python must get when Lua publishes that case.

CASES: dict[str, object] = {
    "int": 42,
    "neg_float": -0.25,
    "huge_float": 1e300,
    "big_double": 2**53,
    "int64": 2**60 + 1,  # beyond doubles: an int64 cdata on the Lua side
    "str": "hello",
    "utf8": "h\u00e9llo \u2713",
    "bytes": b"\xff\x00\x01binary",
    "empty_str": "",
    "dict_word": "data",  # a dictionary word as a value, not a key
    "true": True,
    "false": False,
    "none": None,  # no data at all: Lua's nil
    "null": NULL,  # ngx.null
    "list": [1, 2, 3],
    "nested": {"a": 1, "b": {"c": [True, False]}, "s": "x"},
    "null_in_table": {"v": NULL, "list": [1, NULL, 3]},
    "sparse": {1: "a", 3: "c"},
    "zero_based": {0: "zero", 1: "one"},
    "empty_table": {},
    "big_string": "z" * 200_000,  # a frame longer than any 2-byte header can announce
}


def _same(a: object, b: object) -> bool:
    """Equal with equal types all the way down (True is not 1, 1.0 is not 1)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}...({len(text)} chars)"


# --- nginx -------------------------------------------------------------------------------


@dataclass
class Nginx:
    prefix: pathlib.Path
    ctl: str
    events: str
    workers: int
    proc: subprocess.Popen[bytes]
    subsystem: str = "http"

    def error_log(self) -> str:
        try:
            return (self.prefix / "error.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_lines(self, *levels: str) -> list[str]:
        return [line for line in self.error_log().splitlines() if any(f"[{lv}]" in line for lv in levels)]

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.error_log().splitlines()[-lines:])


def _render_conf(prefix: pathlib.Path, *, workers: int, events: str, ctl: str,
                 serve_broker: bool, stub_disable_listening: bool, broker_only: bool,
                 subsystem: str = "http") -> str:
    broker_server = ""
    # The log phase runs once an events connection has ended, after anything run() logged:
    # the count it keeps tells a test when a peer's disconnect has been handled.
    handlers = ('content_by_lua_block { require("wbglue").run() } '
                'log_by_lua_block { require("wbglue").closed() }')
    if serve_broker and subsystem == "http":
        broker_server = (
            "    server {\n"
            f"        listen unix:{events};\n"
            f"        location / {{ {handlers} }}\n"
            "    }\n"
        )
    elif serve_broker:
        broker_server = (
            "    server {\n"
            f"        listen unix:{events};\n"
            f"        {handlers}\n"
            "    }\n"
        )
    values = {
        "MODULES": str(MODULES),
        # As root, nginx would run its workers as nobody, who cannot enter our 0700 temp
        # directory nor pass our broker's peer-uid check.
        "USER": "user root;" if os.geteuid() == 0 else "",
        "WORKERS": str(workers),
        "PREFIX": str(prefix),
        "GLUE": str(GLUE / "lualib"),
        "LRE": os.environ[LRE_ENV],
        "EVENTS": events,
        "CTL": ctl,
        "UNIQUE_TIMEOUT": str(UNIQUE_TIMEOUT),
        "STUB_DISABLE_LISTENING": "true" if stub_disable_listening else "false",
        "BROKER_ONLY": "true" if broker_only else "false",
        "BROKER_SERVER": broker_server,
    }
    text = (GLUE / ("nginx.conf.in" if subsystem == "http" else "nginx-stream.conf.in")).read_text()
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", value)
    leftover = [line for line in text.splitlines() if "@@" in line and not line.lstrip().startswith("#")]
    assert not leftover, f"unfilled placeholders in nginx.conf.in: {leftover}"
    return text


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Graceful stop of the master (SIGQUIT), then SIGKILL to whatever is left of the group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # workers, should any outlive the master
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def nginx(prefix: pathlib.Path, *, workers: int, events: str, serve_broker: bool,
          stub_disable_listening: bool = False, broker_only: bool = False,
          subsystem: str = "http") -> Iterator[Nginx]:
    """Run nginx in the foreground in its own process group under ``prefix``."""
    assert NGINX is not None
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    ctl = str(prefix / "ctl.sock")
    conf = prefix / "nginx.conf"
    conf.write_text(_render_conf(prefix, workers=workers, events=events, ctl=ctl, serve_broker=serve_broker,
                                 stub_disable_listening=stub_disable_listening, broker_only=broker_only,
                                 subsystem=subsystem))
    errlog = str(prefix / "error.log")
    with open(prefix / "stderr.log", "wb") as out:
        proc = subprocess.Popen(
            [NGINX, "-p", str(prefix), "-c", str(conf), "-e", errlog],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    run = Nginx(prefix, ctl, events, workers, proc, subsystem)
    try:
        try:
            # not by connecting: a stream {} server runs its Lua on a probe connection
            wait_for_listening(ctl, proc, timeout=15)
            if serve_broker:
                wait_for_listening(events, proc, timeout=15)
        except (RuntimeError, TimeoutError) as exc:
            stderr = (prefix / "stderr.log").read_text(errors="replace")
            raise AssertionError(f"nginx did not start: {exc}\n{stderr}\n{run.log_tail()}") from exc
        yield run
    finally:
        _stop_group(proc)


# --- talking to the Lua side -------------------------------------------------------------


@dataclass
class Answer:
    """What the control API answered: an HTTP response (http) or a "STATUS TEXT" line (stream)."""

    status_code: int
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


def _ask_stream(path: str, line: str) -> Answer:
    """One command line to the stream control server; its one answer line (blocking)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(line.encode() + b"\n")
        data = b""
        for _ in range(100_000):  # the records of a run fit in far fewer chunks
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if data.endswith(b"\n"):
                break
    status, _, text = data.decode().rstrip("\n").partition(" ")
    return Answer(int(status), text)


class Lua:
    """The glue's control API (tests/nginx/lualib/wbglue.lua) on its unix socket."""

    def __init__(self, run: Nginx) -> None:
        self.run = run

    async def _call(self, method: str, path: str, params: dict[str, str | int] | None = None) -> Answer:
        if self.run.subsystem == "stream":
            p = params or {}
            words = [path.strip("/")]
            if words[0] == "publish":
                words += [str(p["case"]), str(p["source"]), str(p["target"]), str(p["count"]),
                          str(p.get("worker", "-"))]
            return await anyio.to_thread.run_sync(_ask_stream, self.run.ctl, " ".join(words))
        transport = httpx.AsyncHTTPTransport(uds=self.run.ctl)
        async with httpx.AsyncClient(transport=transport, base_url="http://nginx", timeout=10) as http:
            r = await http.request(method, path, params=params)
            return Answer(r.status_code, r.text)

    async def publish(self, case: str, *, source: str, target: str = "all", count: int = 1,
                      worker: int | None = None) -> None:
        """Publish ``count`` times from nginx (from worker ``worker`` if given)."""
        params: dict[str, str | int] = {"case": case, "source": source, "target": target, "count": count}
        if worker is not None:
            params["worker"] = worker
        # nginx hands each connection to some worker; the glue answers 409 from the wrong one
        for _ in range(200):
            r = await self._call("POST", "/publish", params)
            if r.status_code != 409:
                break
        assert r.status_code == 200, f"Lua publish of {case!r} failed: {r.status_code} {r.text}"

    async def received(self, source: str | None = None) -> list[dict[str, Any]]:
        r = await self._call("GET", "/received")
        assert r.status_code == 200, r.text
        records: list[dict[str, Any]] = r.json()
        return [rec for rec in records if source is None or rec["source"] == source]

    async def ready(self) -> bool:
        r = await self._call("GET", "/ready")
        return r.text.strip() == "1" * self.run.workers

    async def closed(self) -> int:
        """How many events connections to nginx's broker have ended (and been logged)."""
        r = await self._call("GET", "/closed")
        assert r.status_code == 200, r.text
        return int(r.text.strip())


async def eventually(check: Callable[[], Awaitable[T]], what: str, run: Nginx, timeout: float = 15.0) -> T:  # noqa: ASYNC109
    """Poll ``check`` (at most 1500 times, within ``timeout`` s) until it returns a truthy value."""
    with anyio.move_on_after(timeout):
        for _ in range(1500):
            result = await check()
            if result:
                return result
            await anyio.sleep(0.01)
    raise AssertionError(f"gave up waiting for {what}\n--- nginx error.log (tail):\n{run.log_tail()}")


def _events(rec: Recorder, source: str) -> list[tuple[str, Any, int | None]]:
    return [(event, data, wid) for (src, event, data, wid) in rec.events if src == source]


async def _sync(lua: Lua, run: Nginx, publisher: Client, lua_receivers: set[int], recs: list[Recorder]) -> None:
    """Publish pings until every Lua receiver and every Python recorder has one.

    A broker registers a worker when its hello arrives, which nobody acknowledges; until
    then an "all" publish may miss it. After this, all parties are known to the broker.
    """
    async def everyone_has_one() -> bool:
        await publisher.publish("sync", "ping", "ping")
        await anyio.sleep(0.05)
        got = {rec["receiver"] for rec in await lua.received("sync")}
        return got >= lua_receivers and all(_events(r, "sync") for r in recs)

    await eventually(everyone_has_one, "every worker to see a ping", run)


async def _mark(lua: Lua, run: Nginx, publish: Callable[[], Awaitable[None]], marker: str,
                lua_receivers: set[int], recs: list[Recorder]) -> None:
    """Publish a target-all marker and wait until everyone has it.

    Each publisher's events reach every worker in publish order, so once a worker has the
    marker it has everything that publisher sent before it.
    """
    await publish()

    async def everyone_has_it() -> bool:
        got = {rec["receiver"] for rec in await lua.received(marker)}
        return got >= lua_receivers and all(_events(r, marker) for r in recs)

    await eventually(everyone_has_it, f"marker {marker!r} at every worker", run)


def _check_lua_got_cases(records: list[dict[str, Any]], receivers: set[int], wid: int | None) -> None:
    """Every Lua receiver got every case exactly once, in order, with the right value."""
    for receiver in receivers:
        mine = [r for r in records if r["receiver"] == receiver]
        assert [r["event"] for r in mine] == list(CASES), f"Lua worker {receiver} got {[r['event'] for r in mine]}"
        bad = [r for r in mine if r["verdict"] != "ok"]
        assert not bad, f"Lua worker {receiver} received wrong values: {bad}"
        if wid is not None:
            assert {r.get("wid") for r in mine} == {wid}


def _check_python_got_cases(rec: Recorder, source: str, wids: set[int]) -> None:
    got = _events(rec, source)
    assert [event for event, _, _ in got] == list(CASES)
    for event, data, wid in got:
        assert _same(data, CASES[event]), f"case {event}: got {_short(data)}, expected {_short(CASES[event])}"
        assert wid in wids, f"case {event}: wid {wid}, expected one of {wids}"


async def _publish_cases(client: Client, source: str) -> None:
    for case, value in CASES.items():
        await client.publish(source, case, value)


def _kong_client(address: str, worker_id: int, transport: str = "http") -> Client:
    # max_payload_len: the big_string case is larger than lua-resty-events' 64 KiB default;
    # nginx is configured with 1 MiB too, and neither broker limits what it relays.
    return Client(address, transport=transport, profile="kong", worker_id=worker_id, max_payload_len=2**20)


#: lua-nginx-module logs every cosocket read timeout at error level (unless
#: lua_socket_log_errors is off, as Kong sets it); lua-resty-events reads with a 5 s timeout
#: and simply reads again, so an idle connection logs this every 5 s.
BENIGN = ("lua tcp socket read timed out",)


def _quiet_log(run: Nginx) -> None:
    problems = [line for line in run.log_lines("error", "crit", "alert", "emerg")
                if not any(text in line for text in BENIGN)]
    assert not problems, "nginx logged errors:\n" + "\n".join(problems)


# --- direction A: nginx is the broker ----------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("subsystem", SUBSYSTEMS)
async def test_python_sidecar_on_a_real_lua_resty_events_broker(sock_dir: str, subsystem: str) -> None:
    prefix = pathlib.Path(sock_dir)
    events = str(prefix / "events.sock")
    with nginx(prefix, workers=1, events=events, serve_broker=True, subsystem=subsystem) as run:
        lua = Lua(run)
        async with _kong_client(f"unix:{events}", -1, subsystem) as py:
            rec = Recorder()
            py.subscribe("*", "*", rec)
            with anyio.fail_after(15):
                await py.wait_ready()
            await eventually(lua.ready, "nginx's events client to connect", run)
            await _sync(lua, run, py, {0}, [rec])

            # Python -> Lua (and back to Python: the publisher gets its own events)
            await _publish_cases(py, "py")
            await _mark(lua, run, lambda: py.publish("py-end", "ping", "ping"), "py-end", {0}, [rec])
            _check_lua_got_cases(await lua.received("py"), {0}, wid=-1)
            _check_python_got_cases(rec, "py", {-1})

            # Lua -> Python
            for case in CASES:
                await lua.publish(case, source="lua")
            await _mark(lua, run, lambda: lua.publish("ping", source="lua-end"), "lua-end", {0}, [rec])
            _check_python_got_cases(rec, "lua", {0})
            _check_lua_got_cases(await lua.received("lua"), {0}, wid=0)

            # unique, both ways: three publishes with one key inside the window, one delivery
            for _ in range(3):
                await py.publish("py-uniq", "str", "hello", target="unique:py-key")
            await _mark(lua, run, lambda: py.publish("py-uend", "ping", "ping"), "py-uend", {0}, [rec])
            await lua.publish("str", source="lua-uniq", target="lua-key", count=3)
            await _mark(lua, run, lambda: lua.publish("ping", source="lua-uend"), "lua-uend", {0}, [rec])
            for source in ("py-uniq", "lua-uniq"):
                in_lua = await lua.received(source)
                in_py = _events(rec, source)
                assert len(in_lua) + len(in_py) == 1, f"{source}: Lua got {in_lua}, Python got {in_py}"
                assert all(r["verdict"] == "ok" for r in in_lua)
            _quiet_log(run)


@pytest.mark.anyio
async def test_real_broker_closes_an_unknown_worker_id(sock_dir: str) -> None:
    """A documented difference: the real broker has queues for ids -1..workers-1 only."""
    prefix = pathlib.Path(sock_dir)
    events = str(prefix / "events.sock")
    with nginx(prefix, workers=1, events=events, serve_broker=True) as run:
        stream, initial = await get_transport("http").connect(events)
        async with stream:
            await stream.send(encode_frame(dumps({"id": 7, "pid": 4242}), 3))
            decoder = FrameDecoder(3)
            frames = decoder.feed(initial)
            closed = False
            with anyio.fail_after(10):
                for _ in range(1000):
                    try:
                        frames += decoder.feed(await stream.receive())
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        closed = True
                        break
        assert closed and not frames
        # broker.lua has no queue for id 7: its write thread dies indexing nil, which ends
        # the connection (and the handler, with a second error from is_closed on that table)
        await eventually(
            lambda: anyio.to_thread.run_sync(lambda: "attempt to index local 'worker_queue'" in run.error_log()),
            "the broker to log the unknown id", run,
        )


@pytest.mark.parametrize("subsystem", SUBSYSTEMS)
def test_workerbus_publish_leaves_no_error_in_the_nginx_log(sock_dir: str, subsystem: str) -> None:
    """A ``workerbus publish`` is a well-behaved peer: the event arrives, and nginx's broker
    logs no error when the command's connection ends (a reset used to log
    "failed to receive the header bytes: connection reset by peer" each time)."""
    prefix = pathlib.Path(sock_dir)
    events = str(prefix / "events.sock")
    publishes = 3
    with nginx(prefix, workers=1, events=events, serve_broker=True, subsystem=subsystem) as run:
        lua = Lua(run)
        anyio.run(eventually, lua.ready, "nginx's events client to connect", run)
        closed_before = anyio.run(lua.closed)
        for _ in range(publishes):
            # the kong profile's default id is -1, the one id a sidecar may use (docs/kong.md §1)
            done = subprocess.run(
                workerbus("publish", f"unix:{events}", "py-cli", "str", '"hello"', "--profile", "kong",
                          "--transport", subsystem),
                capture_output=True, text=True, timeout=60, cwd=str(ROOT))
            assert done.returncode == 0, done.stderr
            assert done.stderr == "", done.stderr

        async def delivered() -> bool:
            got = await lua.received("py-cli")
            return len(got) >= publishes and all(r["verdict"] == "ok" for r in got)

        async def all_closed() -> bool:
            return await lua.closed() - closed_before >= publishes

        anyio.run(eventually, delivered, "Lua to receive every published event", run)
        # Each command's connection has ended and nginx has finished with it (log phase), so
        # whatever its broker had to say about that disconnect is in the log by now.
        anyio.run(eventually, all_closed, "nginx to finish the publishers' connections", run)
        assert len(anyio.run(lua.received, "py-cli")) == publishes
        _quiet_log(run)


# --- direction B: nginx workers use a workerbus broker -----------------------------------


@contextmanager
def workerbus_broker(prefix: pathlib.Path, events: str, transport: str = "http") -> Iterator[None]:
    """``workerbus broker --profile kong`` on ``events``, logging to prefix/broker.log."""
    cmd = workerbus("broker", "--profile", "kong", "--transport", transport, "--listen", f"unix:{events}",
                    "--unique-timeout", str(UNIQUE_TIMEOUT), "--log-level", "INFO")
    with open(prefix / "broker.log", "wb") as log, running(cmd, stderr=log, cwd=str(ROOT)) as proc:
        wait_for_socket(events, proc)
        yield


@pytest.mark.anyio
@pytest.mark.parametrize("subsystem", SUBSYSTEMS)
async def test_real_nginx_workers_on_a_workerbus_broker(sock_dir: str, subsystem: str) -> None:
    prefix = pathlib.Path(sock_dir)
    events = str(prefix / "wb.sock")
    with workerbus_broker(prefix, events, subsystem):
        # Two real nginx workers, both clients of our broker. disable_listening (lua-resty-
        # events' C module, not loaded here) would close nginx's own listener on the events
        # socket; nginx has none here, so the glue replaces it by a no-op (docs/kong.md §2
        # has the workaround for running with the C module).
        with nginx(prefix, workers=2, events=events, serve_broker=False, stub_disable_listening=True,
                   subsystem=subsystem) as run:
            lua = Lua(run)
            async with _kong_client(f"unix:{events}", 2, subsystem) as py2, \
                    _kong_client(f"unix:{events}", -1, subsystem) as agent:
                recs = [Recorder(), Recorder()]
                py2.subscribe("*", "*", recs[0])
                agent.subscribe("*", "*", recs[1])
                with anyio.fail_after(15):
                    await py2.wait_ready()
                    await agent.wait_ready()
                await eventually(lua.ready, "both nginx workers to connect to our broker", run)
                await _sync(lua, run, py2, {0, 1}, recs)

                # Python -> both nginx workers (and both Python clients)
                await _publish_cases(py2, "py")
                await _mark(lua, run, lambda: py2.publish("py-end", "ping", "ping"), "py-end", {0, 1}, recs)
                _check_lua_got_cases(await lua.received("py"), {0, 1}, wid=2)
                for rec in recs:
                    _check_python_got_cases(rec, "py", {2})

                # nginx worker 1 -> everyone; one publisher, so one order to check
                for case in CASES:
                    await lua.publish(case, source="lua", worker=1)
                await _mark(lua, run, lambda: lua.publish("ping", source="lua-end", worker=1),
                            "lua-end", {0, 1}, recs)
                for rec in recs:
                    _check_python_got_cases(rec, "lua", {1})
                _check_lua_got_cases(await lua.received("lua"), {0, 1}, wid=1)

                # unique both ways: exactly one delivery among the four workers
                for _ in range(3):
                    await py2.publish("py-uniq", "str", "hello", target="unique:py-key")
                await _mark(lua, run, lambda: py2.publish("py-uend", "ping", "ping"), "py-uend", {0, 1}, recs)
                await lua.publish("str", source="lua-uniq", target="lua-key", count=3, worker=0)
                await _mark(lua, run, lambda: lua.publish("ping", source="lua-uend", worker=0),
                            "lua-uend", {0, 1}, recs)
                for source in ("py-uniq", "lua-uniq"):
                    in_lua = await lua.received(source)
                    in_py = [e for rec in recs for e in _events(rec, source)]
                    assert len(in_lua) + len(in_py) == 1, f"{source}: Lua got {in_lua}, Python got {in_py}"
                _quiet_log(run)



# --- the conformance kit against the real broker -----------------------------------------

#: Cases that need one connection only. Against the real broker they pass once the kit's
#: worker id is one the broker has a queue for (-1); see the second half of the test.
ONE_CONNECTION_CASES = (
    "basic.roundtrip", "handshake.exact", "handshake.header-case", "handshake.extra-headers",
    "handshake.header-order", "handshake.connection-list", "handshake.other-path",
    "pipeline.dribble", "frame.one-byte",
)


def _kit(events: str, transport: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = workerbus("conformance", "broker", f"unix:{events}", "--profile", "kong", "--transport", transport,
                    "--unique-timeout", str(UNIQUE_TIMEOUT), "--timeout", "2", *args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          cwd=str(ROOT))


@pytest.mark.parametrize("subsystem", SUBSYSTEMS)
def test_conformance_kit_against_the_real_broker(sock_dir: str, subsystem: str) -> None:
    prefix = pathlib.Path(sock_dir)
    events = str(prefix / "events.sock")
    listing = subprocess.run(workerbus("conformance", "broker", "--list", "--transport", subsystem),
                             capture_output=True, text=True, timeout=60, check=True).stdout
    names = [line.split(":", 1)[0] for line in listing.splitlines() if line.strip()]

    with nginx(prefix, workers=1, events=events, serve_broker=True, subsystem=subsystem):
        report_path = prefix / "report.json"
        done = _kit(events, subsystem, "--json", str(report_path))
        assert done.returncode == 1, done.stdout + done.stderr  # it ran, and found failures
        report = json.loads(report_path.read_text())
    status = {case["name"]: case["status"] for case in report["cases"]}
    sys.stdout.write(done.stdout)  # the record, visible with pytest -s
    assert list(status) == names
    if subsystem == "http":
        # Real behavioural differences (docs/kong.md): lua-resty-events upgrades any request...
        assert {status[n] for n in ("reject.no-upgrade", "reject.wrong-token", "reject.method")} == {"fail"}
        # ...but what is not HTTP at all is refused by nginx's own parser, with a 400
        assert status["reject.garbage"] == "pass"
    # the kit's ids (1000 and up) have no queue in the real broker: it closes them
    assert status["basic.roundtrip"] == "fail"

    # With nginx running the broker side only, and each case's first id mapped to -1 (the
    # id whose queue the real broker creates on demand), the one-connection cases pass
    # (the handshake cases are http-only: skipped by the kit over stream).
    with nginx(prefix, workers=1, events=events, serve_broker=True, broker_only=True, subsystem=subsystem):
        for name in ONE_CONNECTION_CASES:
            base = -1 - 10 * names.index(name)
            done = _kit(events, subsystem, "--only", name, f"--id-base={base}")
            assert done.returncode == 0, done.stdout + done.stderr
            assert "1 passed" in done.stdout or (subsystem == "stream" and name.startswith("handshake.")), done.stdout
