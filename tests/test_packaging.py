"""The built wheel carries every package (a subpackage missing from it once went unnoticed)."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import tempfile
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_wheel_imports_every_package_outside_the_checkout() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        build = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp, str(ROOT)],
            capture_output=True, timeout=300,
        )
        assert build.returncode == 0, build.stderr.decode()
        # The license is declared the current (SPDX) way: no deprecation warning from the build.
        assert b"Deprecat" not in build.stderr, build.stderr.decode()
        (wheel,) = pathlib.Path(tmp).glob("workerbus-*.whl")
        with zipfile.ZipFile(wheel) as zf:
            (meta,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
            assert "License-Expression: MIT" in zf.read(meta).decode().splitlines()
        target = pathlib.Path(tmp) / "site"
        install = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
            capture_output=True, timeout=300,
        )
        assert install.returncode == 0, install.stderr.decode()
        code = (
            "import shared, shared.tools.conformance.cli, shared.tools.bench.cli, shared.embed, shared.luabuf, "
            "httpbus, streambus, shared.tools.cli; "
            f"assert all(m.__file__.startswith({str(target)!r}) for m in "
            "(shared, shared.tools.conformance.cli, shared.tools.bench.cli, httpbus, streambus)); "
            "shared.tools.cli.build_parser().parse_args(['conformance', 'broker', 'unix:/x']); "
            # the demo's ASGI app ships too: `workerbus demo --asgi` needs no checkout
            "import importlib.util; "
            f"assert importlib.util.find_spec('shared.tools.asgi_app').origin.startswith({str(target)!r})"
        )
        # Run from the temp dir with only the installed copy on the path, not the checkout.
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
            capture_output=True, timeout=60,
        )
        assert done.returncode == 0, done.stderr.decode()
