"""Command-line errors as a user meets them: one line on stderr, a non-zero exit, no
traceback; and every option's --help says what it does and its default."""

from __future__ import annotations

import argparse
import os
import subprocess

import pytest

from shared.tools.cli import build_parser

from .proc import broker, workerbus


def _subparsers(parser: argparse.ArgumentParser, name: str) -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(name, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                found += _subparsers(sub, f"{name} {sub_name}")
    return found


def test_every_option_says_what_it_does_and_its_default() -> None:
    missing = []
    for name, parser in _subparsers(build_parser(), "workerbus"):
        parser.format_help()  # every %(default)s renders
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            label = f"{name} {'/'.join(action.option_strings) or action.dest}"
            text = action.help or ""
            if not text or text == argparse.SUPPRESS:
                missing.append(f"{label}: no help")
            elif action.option_strings and not action.required and action.nargs != 0 \
                    and "default" not in text:  # nargs 0: a flag, off unless given
                missing.append(f"{label}: no default in {text!r}")
    assert missing == []


def _one_line_error(args: list[str], timeout: float = 30) -> str:
    run = subprocess.run(workerbus(*args), capture_output=True, text=True, timeout=timeout)
    assert run.returncode != 0, run.stdout + run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert "Traceback" not in run.stderr and "ready" not in run.stderr
    return lines[0]


LONG = "/tmp/" + "x" * 110 + ".sock"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["broker", "--listen", "unix:/tmp/wb-x.sock", "--log-level", "LOUD"], "--log-level: expected one of DEBUG"),
        (["tail", "unix:/tmp/wb-x.sock", "--log-level", "verbose"], "--log-level: expected one of DEBUG"),
        (["broker", "--listen", "unix:/tmp/wb-x.sock", "--mode", "999"], "--mode: expected an octal file mode"),
        (["broker", "--listen", "unix:/tmp/wb-x.sock", "--mode", "1777"], "--mode: expected permission bits"),
        (["broker", "--listen", f"unix:{LONG}"], "over the 107 bytes AF_UNIX allows"),
        (["broker", "--listen", "unix:/tmp/wb-x.sock", "--stats-listen", f"unix:{LONG}"], "107 bytes"),
        (["broker", "--listen", "unix:bus.sock"], "'bus.sock' is relative"),
        (["publish", "unix:bus.sock", "s", "e"], "is relative"),
        (["tail", "unix:bus.sock"], "is relative"),
        (["stats", "unix:bus.sock"], "is relative"),
        (["conformance", "broker", "unix:bus.sock"], "is relative"),
        (["publish", "unix:/tmp/wb-x.sock", "s", "e", "--timeout", "-1"], "--timeout: must be a number of seconds > 0"),
        (["stats", "unix:/tmp/wb-x.sock", "--timeout", "0"], "--timeout: must be a number of seconds > 0"),
        (["tail", "unix:/tmp/wb-x.sock", "--count", "-5"], "--count: must not be negative"),
        (["broker", "--listen", "unix:/tmp/wb-x.sock", "--workers", "-1"], "--workers: must be 0..4096, got -1"),
        (["broker", "--listen", "unix:/tmp/wb-x.sock", "--workers", "100000000"], "--workers: must be 0..4096"),
        (["tail", "unix:/tmp/wb-x.sock", "--id", "99999999999999999999"], "--id: a worker id must fit in a signed 64-bit"),
        (["publish", "unix:/tmp/wb-x.sock", "s", "e", "--id", "-99999999999999999999"], "--id: a worker id must fit"),
        (["broker", "--listen", "unix:/tmp/wb-x.sock", "--max-queue-len", "0"], "--max-queue-len: must be at least 1"),
        (["broker", "--listen", "unix:/tmp/wb-x.sock", "--max-connections", "-3"], "--max-connections: must be at least 1"),
        (["broker", "--listen", "unix:/tmp/wb-x.sock", "--unique-timeout", "0"], "--unique-timeout: must be"),
        (["broker", "--listen", "unix:/tmp/wb-x.sock", "--handshake-timeout", "nan"], "--handshake-timeout: must be"),
        (["broker", "--listen", "unix:/tmp/wb-x.sock", "--queue-grace", "-1"], "--queue-grace: must be"),
        (["broker", "--listen", "unix:/tmp/wb-x.sock", "--max-payload-len", "70000"], "max_payload_len must be within 1..65535"),
        (["demo", "--workers", "0"], "--workers: must be 1..64, got 0"),
        (["demo", "--workers", "100000"], "--workers: must be 1..64"),
        (["publish", "unix:/tmp/wb-x.sock", "s", "e", "NaN"], "JSON-DATA is not valid JSON: NaN is not a JSON value"),
        (["publish", "unix:/tmp/wb-x.sock", "s", "e", "[" * 100000], "JSON-DATA is not valid JSON"),
        (["broker", "--listen", "unix:/tmp/wb-nodir/x.sock"], "cannot listen: [Errno 2] No such file or directory: '/tmp/wb-nodir/x.sock'"),
        (["broker", "--listen", "unix:/tmp/wb-x.sock", "--bridge", "nats://"], "bridge URL 'nats://': no host"),
        (["broker", "--listen", "unix:/tmp/wb-x.sock", "--bridge", "redis+unix://"], "no socket path"),
        (["demo", "--nodes", "1"], "--nodes: a cluster needs at least 2 nodes"),
        (["demo", "--nodes", "2", "--asgi"], "--nodes runs its own brokers"),
        (["demo", "--nodes", "2", "--transport", "http"], "takes neither --asgi nor --transport"),
        (["publish", "unix:/tmp/wb-x.sock", "", ""], "SOURCE and EVENT must not be empty"),
        (["publish", "unix:/tmp/wb-x.sock", "s", "e", "--target", "worker:99999999999999999999"], "signed 64-bit"),
        (["top", "unix:/tmp/wb-x.sock", "--bogus"], "workerbus top: unrecognized arguments: --bogus"),
        (["conformance", "broker", "unix:/tmp/wb-x.sock", "--bogus"], "workerbus conformance broker: unrecognized"),
        (["bench", "--from-json", "/nonexistent/r.json"], "--from-json /nonexistent/r.json: [Errno 2]"),
        (["bench", "--from-json", "/tmp"], "Is a directory"),
        (["bench", "--max-bg", "500"], "--max-bg: must be a percentage"),
        (["bench", "--json", "/nonexistent/r.json"], "--json: no directory /nonexistent"),
        (["conformance", "broker", "unix:/tmp/wb-x.sock", "--json", "/nonexistent/r.json"], "--json: no directory"),
        (["conformance", "broker", "unix:/tmp/wb-x.sock", "--workers", "0"], "--workers: must be >= 1"),
    ],
)
def test_user_errors_are_one_line(args: list[str], expected: str) -> None:
    assert expected in _one_line_error(args)


@pytest.mark.slow
def test_version() -> None:
    run = subprocess.run(workerbus("--version"), capture_output=True, text=True, timeout=30)
    assert (run.returncode, run.stderr) == (0, "")
    assert run.stdout.startswith("workerbus ") and len(run.stdout.splitlines()) == 1


@pytest.mark.slow
def test_long_socket_path_is_refused_before_ready(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "b" * (108 - len(sock_dir)))
    line = _one_line_error(["broker", "--listen", f"unix:{path}"])
    assert f"is {len(os.fsencode(path))} bytes long" in line and "107" in line
    assert not os.path.exists(path)


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["http", "stream"])
def test_stats_pointed_at_a_bus_socket_says_so(sock_dir: str, transport: str) -> None:
    path = os.path.join(sock_dir, "bus.sock")
    # A short handshake deadline: a stream broker hangs up on the request at the latest then.
    with broker(path, "--handshake-timeout", "0.5", transport=transport):
        line = _one_line_error(["stats", f"unix:{path}", "--timeout", "20"])
    assert "not a statistics socket" in line and "--stats-listen" in line
    assert f"is a bus socket ({transport} transport)" in line


@pytest.mark.slow
def test_conformance_on_a_missing_socket_is_one_line(sock_dir: str) -> None:
    address = f"unix:{os.path.join(sock_dir, 'nobody.sock')}"
    run = subprocess.run(workerbus("conformance", "broker", address), capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert run.stdout == ""  # no case ran
    assert run.stderr.splitlines() == [f"conformance: cannot connect to {address}: No such file or directory"]


@pytest.mark.slow
def test_help_shows_defaults() -> None:
    run = subprocess.run(workerbus("broker", "--help"), capture_output=True, text=True, timeout=30)
    assert run.returncode == 0
    text = " ".join(run.stdout.split())
    assert "(default 10240)" in text and "(default drop-newest)" in text and "(default INFO)" in text
    run = subprocess.run(workerbus("publish", "--help"), capture_output=True, text=True, timeout=30)
    assert "(default WARNING)" in " ".join(run.stdout.split())


def test_library_refuses_relative_and_over_long_socket_paths() -> None:
    from shared.client import Client
    from shared.transport import parse_address

    assert parse_address("unix:/run/app/bus.sock") == "/run/app/bus.sock"
    with pytest.raises(ValueError, match="relative"):
        Client("unix:bus.sock", transport="http")
    fits = "/" + "f" * 106
    assert parse_address(f"unix:{fits}") == fits
    with pytest.raises(ValueError, match="108 bytes long, over the 107 bytes AF_UNIX allows"):
        parse_address(f"unix:{fits}x")
