"""Shared fixtures: both anyio backends, both transports, a temp socket path, a broker."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest

# The tests name transports by string ("http", "stream", the ``transport`` fixture). The
# core resolves a name only once the transport's package has registered it on import
# (docs/architecture.md), so the suite imports both, as an application would the one it uses.
import httpbus  # noqa: F401
import streambus  # noqa: F401
from shared import compiled
from shared.broker import Broker


def pytest_configure(config: pytest.Config) -> None:
    # The compiled build (docs/compiled.md) only: a mypyc-compiled coroutine passes a
    # cancellation on to what it awaits with throw()'s (type, exc, tb) signature, which
    # Python >= 3.12 deprecates (mypyc/mypyc#1214, open). The warning is mypyc's runtime,
    # not this project's code; everything else still fails the run.
    if any(compiled.status().values()):
        config.addinivalue_line(
            "filterwarnings",
            r"ignore:the \(type, exc, tb\) signature of throw\(\) is deprecated:DeprecationWarning",
        )


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["stream", "http"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # Short paths: a Unix socket path must fit in 108 bytes, and pytest's tmp_path may not.
    path = tempfile.mkdtemp(prefix="wb-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def address(sock_dir: str) -> str:
    return f"unix:{os.path.join(sock_dir, 'bus.sock')}"


@pytest.fixture
async def broker(address: str, transport: str) -> AsyncIterator[Broker]:
    """A broker serving ``address`` on ``transport`` for the duration of the test."""
    b = Broker(transport=transport, expected_workers=4, unique_timeout=0.3)
    async with anyio.create_task_group() as tg:
        await tg.start(b.serve, address)
        yield b
        tg.cancel_scope.cancel()

