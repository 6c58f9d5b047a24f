"""The optional compiled build (docs/compiled.md): which modules run compiled, said the same
way everywhere, and a build that no longer matches its sources is refused.

``WORKERBUS_EXPECT_COMPILED=1`` (CI's compiled lane) makes the suite fail unless every
module of ``shared.compiled.MODULES`` really runs compiled; ``=0`` unless none does. So a
lane cannot silently test the pure package twice, or the compiled one by accident.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

import shared
from shared import compiled

ROOT = Path(__file__).resolve().parent.parent
SUFFIX = EXTENSION_SUFFIXES[0]


def test_the_build_is_what_the_environment_expects() -> None:
    expected = os.environ.get("WORKERBUS_EXPECT_COMPILED")
    state = compiled.status()
    assert set(state) == set(compiled.MODULES)
    if expected == "1":
        assert all(state.values()), f"expected a compiled build, got {state}"
    elif expected == "0":
        assert not any(state.values()), f"expected pure Python, got {state}"
    else:
        pytest.skip(f"WORKERBUS_EXPECT_COMPILED not set; compiled: {compiled.summary()}")


def test_info_says_which_modules_run_compiled() -> None:
    run = subprocess.run([sys.executable, "-m", "shared.tools.cli", "info"], capture_output=True, text=True,
                         timeout=60, check=False, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    state = compiled.status()
    for name, native in state.items():
        assert f"{name}: {'compiled' if native else 'pure Python'}" in lines
    assert f"compiled: {compiled.summary()}" in lines
    assert (compiled.summary() == "no") == (not any(state.values()))


def _package_copy(tmp_path: Path) -> Path:
    # A copy of the package's sources with a stand-in extension beside frame.py and the
    # build's record, as scripts/build_compiled.py leaves them.
    package = tmp_path / "shared"
    shutil.copytree(ROOT / "shared", package, ignore=shutil.ignore_patterns("*.so", "*.pyd", "compiled.*.json",
                                                                            "__pycache__", "tools"))
    source = package / "frame.py"
    extension = package / f"frame{SUFFIX}"
    extension.write_bytes(b"not loaded by these tests")
    os.utime(source, (1_000_000, 1_000_000))
    os.utime(extension, (2_000_000, 2_000_000))
    record = package / ("compiled" + SUFFIX.rsplit(".", 1)[0] + ".json")
    record.write_text(json.dumps({"shared.frame": hashlib.sha256(source.read_bytes()).hexdigest()}))
    return package


def test_a_build_newer_than_its_sources_passes(tmp_path: Path) -> None:
    shared._check_compiled_build(str(_package_copy(tmp_path)))


def test_a_touched_but_unchanged_source_passes(tmp_path: Path) -> None:
    # (a checkout that rewrote the file with the same bytes: newer, but the same source)
    package = _package_copy(tmp_path)
    os.utime(package / "frame.py", (3_000_000, 3_000_000))
    shared._check_compiled_build(str(package))


def test_an_edited_source_refuses_the_build(tmp_path: Path) -> None:
    package = _package_copy(tmp_path)
    with open(package / "frame.py", "a") as f:
        f.write("\n# edited after the build\n")
    os.utime(package / "frame.py", (3_000_000, 3_000_000))
    with pytest.raises(ImportError, match=r"compiled shared\.frame was built from another version.*compiled\.sh build"):
        shared._check_compiled_build(str(package))


def test_a_broken_record_refuses_the_build(tmp_path: Path) -> None:
    package = _package_copy(tmp_path)
    (package / ("compiled" + SUFFIX.rsplit(".", 1)[0] + ".json")).write_text("[1, 2")
    with pytest.raises(ImportError, match="not a compiled build's record"):
        shared._check_compiled_build(str(package))


def test_a_stale_build_stops_import_shared_with_one_line(tmp_path: Path) -> None:
    # The real import, in a fresh interpreter, of a package copy whose frame.py changed.
    package = _package_copy(tmp_path)
    with open(package / "frame.py", "a") as f:
        f.write("\n# edited after the build\n")
    os.utime(package / "frame.py", (3_000_000, 3_000_000))
    run = subprocess.run([sys.executable, "-c", "import shared"], capture_output=True, text=True, timeout=60,
                         check=False, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert run.returncode != 0
    assert run.stderr.strip().splitlines()[-1].startswith("ImportError: workerbus: the compiled shared.frame")
    # and without the record (the pure package), nothing is checked
    (package / ("compiled" + SUFFIX.rsplit(".", 1)[0] + ".json")).unlink()
    run = subprocess.run([sys.executable, "-c", "import shared; print(shared.__file__)"], capture_output=True,
                         text=True, timeout=60, check=False, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(package / "__init__.py")
