"""Smoke run of the atheris harnesses in fuzz/, so they cannot rot between the real runs.

The real runs (a million inputs each) are ``bash fuzz/run.sh``; results in
docs/hardening.md §4. Here each harness gets a few thousand inputs from an empty corpus.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import tempfile

import pytest

from tests.faultkit import PY, REPO

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed"),
]


@pytest.mark.parametrize("harness", ["frame", "handshake", "codec", "publish"])
def test_fuzz_harness_smoke(harness: str) -> None:
    runs = 3000
    with tempfile.TemporaryDirectory() as corpus:
        done = subprocess.run(
            [PY, os.path.join("fuzz", f"fuzz_{harness}.py"), f"-atheris_runs={runs}", "-timeout=5",
             f"-artifact_prefix={corpus}/", corpus],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Done {runs} " in done.stderr
