"""``workerbus bench --plot DIR``: PNG charts from a saved result and from a real tiny run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faultkit import REPO

PIL = pytest.importorskip("PIL.Image", reason="the plot extra (matplotlib, with Pillow) is not installed")
pytest.importorskip("matplotlib", reason="the plot extra is not installed")

SAVED = os.path.join(REPO, "benchmarks", "results", "2026-11-27.json")


def _bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared.tools.cli", "bench", *args], cwd=REPO,
        capture_output=True, text=True, timeout=timeout, check=False, start_new_session=True,
    )  # fmt: skip


def _check_png(path: Path, min_w: int = 500, min_h: int = 300) -> tuple[int, int]:
    """The file decodes as a PNG of a sane size (and is not blank)."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with PIL.open(path) as img:
        assert img.format == "PNG"
        img.load()  # decodes every row: a truncated file fails here
        width, height = img.size
        colours = img.convert("L").getextrema()
    assert min_w <= width <= 4000 and min_h <= height <= 4000, (path, img.size)
    assert colours[0] < 100 < colours[1], "a chart has dark text on a light background"
    return width, height


def test_plots_from_a_saved_result(tmp_path: Path) -> None:
    out = tmp_path / "img"  # created by the command
    done = _bench("--from-json", SAVED, "--plot", str(out))
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["deliveries.png", "latency.png", "seed.png"]
    for name in names:
        _check_png(out / name)
        assert f"wrote {out / name}" in done.stderr
    assert "Fan-out" in done.stdout  # the tables are still printed


@pytest.mark.slow
def test_plots_of_a_tiny_real_run(tmp_path: Path) -> None:
    out = tmp_path / "plots"
    done = _bench(
        "--peers", "workerbus-stream-asyncio", "--tests", "lat,thr", "--subs", "1,2", "--pubs", "1",
        "--lat-subs", "2", "--events", "2000", "--rate", "2000", "--duration", "0.3", "--reps", "1",
        "--no-seed", "--wait-idle", "0", "--retries", "0", "--plot", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    # No seed experiment in this run, so no seed chart.
    assert sorted(p.name for p in out.iterdir()) == ["deliveries.png", "latency.png"]
    for png in out.iterdir():
        _check_png(png, min_h=200)


def test_plot_into_a_file_fails_before_measuring(tmp_path: Path) -> None:
    target = tmp_path / "not-a-dir"
    target.write_text("")
    done = _bench("--quick", "--plot", str(target), timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"workerbus bench: --plot {target}: exists and is not a directory"]


def test_plot_without_matplotlib_says_which_extra(tmp_path: Path) -> None:
    # The same command, in an interpreter where matplotlib cannot be imported.
    code = ("import sys, runpy; sys.modules['matplotlib'] = None; "
            "sys.argv = ['workerbus', 'bench', '--from-json', sys.argv[1], '--plot', sys.argv[2]]; "
            "runpy.run_module('shared.tools.cli', run_name='__main__')")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, SAVED, str(tmp_path / "img")], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["workerbus bench: --plot needs matplotlib (pip install 'workerbus[plot]')"]
    assert not (tmp_path / "img").exists()
