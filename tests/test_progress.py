"""Progress lines: on a terminal one line redrawn with the time left; piped, nothing extra.

The long commands run the way a user runs them, once on a pseudo-terminal and once through
a pipe, and the two outputs are compared.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from shared.tools.progress import Progress, format_left
from tests.faultkit import PY, REPO, BrokerProc, reap
from tests.ptykit import PtyProc

# --- the helper itself (a fake terminal and a fake clock) ------------------------------------


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_format_left() -> None:
    assert [format_left(s) for s in (0.2, 40, 59.4, 90, 2999, 3600 * 2 + 300)] == [
        "~0 s left", "~40 s left", "~59 s left", "~2 min left", "~50 min left", "~2 h 05 min left"]


def test_estimate_uses_the_speed_so_far_and_the_weights() -> None:
    term, clock = FakeTerminal(), Clock()
    p = Progress(3, stream=term, weights=[1, 1, 2], clock=clock)
    p.start("case a")
    assert p.line() == "[1/3] case a … estimating time left"
    clock.now += 10
    p.done()
    p.start("case b")
    assert p.line() == "[2/3] case b … ~30 s left"  # 10 s per weight; 1 + 2 to go
    clock.now += 4
    assert p.line() == "[2/3] case b … ~26 s left"  # counts down while the item runs
    clock.now += 20  # the item overran its share: never a negative estimate
    assert p.line() == "[2/3] case b … ~20 s left"
    assert term.getvalue().startswith("\r\x1b[K[1/3] case a")


def test_a_note_before_the_first_item() -> None:
    term = FakeTerminal()
    p = Progress(2, stream=term, clock=Clock())
    p.note("waiting for an idle machine …")
    assert term.getvalue() == "\r\x1b[Kwaiting for an idle machine …"
    p.start("run 1")
    p.note("ignored once items run")
    assert p.line() == "[1/2] run 1 … estimating time left"


def test_a_guess_gives_an_estimate_before_the_first_item_ends() -> None:
    p = Progress(2, stream=FakeTerminal(), weights=[3, 5], seconds_per_weight=2.0, clock=Clock())
    p.start("run 1")
    assert p.line().endswith("~16 s left")


def test_other_output_takes_the_line_away_and_puts_it_back() -> None:
    term, out = FakeTerminal(), FakeTerminal()
    p = Progress(2, stream=term, clock=Clock())
    p.start("case a")
    p.print("PASS case a", file=out)
    assert out.getvalue() == "PASS case a\n"
    # cleared before the other output, drawn again after it
    assert term.getvalue().endswith("\r\x1b[K\r\x1b[K[1/2] case a … estimating time left")
    with p:
        pass
    assert term.getvalue().endswith("\r\x1b[K")  # the line is gone when it ends


def test_not_a_terminal_draws_nothing() -> None:
    piped = io.StringIO()
    with Progress(2, stream=piped) as p:
        p.start("case a")
        p.done()
        p.print("PASS case a")
    assert piped.getvalue() == "PASS case a\n"


def test_lines_fit_the_terminal_width() -> None:
    term = FakeTerminal()
    p = Progress(1, stream=term, clock=Clock())
    p.start("x" * 500)
    drawn = term.getvalue().split("\r\x1b[K")[-1]
    assert 10 <= len(drawn) < shutil.get_terminal_size((80, 24)).columns


# --- the commands, on a pty and through a pipe ----------------------------------------------

_PROGRESS = re.compile(r"\r\x1b\[K\[(\d+)/(\d+)\] case [\w.-]+ … (~\d+ s left|estimating time left)")


@pytest.mark.slow
def test_conformance_shows_progress_on_a_terminal_only(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "bus.sock")
    cmd = [PY, "-m", "shared.tools.cli", "conformance", "broker", f"unix:{path}", "--only", "basic",
           "--only", "target.*", "--only", "frame.*"]  # fmt: skip
    with reap() as procs:
        procs.append(BrokerProc(path, "--log-level", "ERROR"))
        piped = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
        # other worker ids: the broker still holds the first run's queues for a while
        with PtyProc([*cmd, "--id-base", "5000"]) as term:
            rc = term.wait(timeout=120)
            screen = term.text
    assert piped.returncode == 0 and rc == 0, piped.stdout + piped.stderr + screen
    cases = [line for line in piped.stdout.splitlines() if line.startswith(("PASS ", "SKIP "))]
    assert len(cases) >= 5 and "0 failed" in piped.stdout
    # Piped: the same lines as before, nothing else, no carriage returns or escapes.
    assert piped.stderr == ""
    assert "\r" not in piped.stdout and "\x1b" not in piped.stdout
    # On the terminal: every case announced on the updating line, with an estimate.
    shown = _PROGRESS.findall(screen)
    assert {int(k) for k, _, _ in shown} == set(range(1, len(cases) + 1))
    assert {int(n) for _, n, _ in shown} == {len(cases)}
    assert any(left.endswith("s left") for _, _, left in shown)
    # and the result lines are whole lines, never glued to the progress line
    for line in cases:
        name = line.split(" (")[0]
        assert re.search(rf"\r\x1b\[K{re.escape(name)} \([\d.]+s\)[^\r\x1b]*\r\n", screen), name


@pytest.mark.slow
def test_bench_shows_progress_on_a_terminal_only(tmp_path: object) -> None:
    cmd = [PY, "-m", "shared.tools.cli", "bench", "--peers", "workerbus-stream-asyncio", "--tests", "lat,thr",
           "--subs", "2", "--pubs", "1", "--lat-subs", "2", "--events", "2000", "--rate", "2000",
           "--duration", "0.3", "--reps", "1", "--no-seed", "--wait-idle", "0", "--retries", "0"]  # fmt: skip
    piped = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
                           start_new_session=True)  # fmt: skip
    assert piped.returncode == 0, piped.stderr
    assert "\r" not in piped.stderr and "\x1b" not in piped.stderr
    assert len(re.findall(r"^\[\d/2 +\d+s\] workerbus-stream-asyncio", piped.stderr, re.M)) == 2
    with PtyProc(cmd) as term:
        assert term.wait(timeout=120) == 0
        screen = term.text
    assert re.search(r"\r\x1b\[K\[1/2\] workerbus-stream-asyncio lat N=2 P=1 … ~\d+ s left", screen)
    assert re.search(r"\r\x1b\[K\[2/2\] workerbus-stream-asyncio thr N=2 P=1 … ~\d+ s left", screen)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed")
def test_fuzz_script_shows_progress_on_a_terminal_only() -> None:
    with tempfile.TemporaryDirectory() as corpus:
        env = dict(os.environ, RUNS="5000", HARNESSES="codec", PY=sys.executable, CORPUS_ROOT=corpus)
        cmd = ["bash", "fuzz/run.sh"]
        piped = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
        with PtyProc(cmd, env={k: env[k] for k in ("RUNS", "HARNESSES", "PY")} | {"CORPUS_ROOT": corpus}) as term:
            assert term.wait(timeout=120) == 0, term.text
            screen = term.text
    assert piped.returncode == 0, piped.stdout + piped.stderr
    assert "\r" not in piped.stdout + piped.stderr and "\x1b" not in piped.stdout + piped.stderr
    assert "== [1/1] fuzz_codec: 5000 inputs" in piped.stdout and "Done 5000" in piped.stdout
    assert re.search(r"\r\x1b\[K\[1/1\] fuzz_codec \d+/5000 inputs … ", screen)
    assert "Done 5000" in screen
