"""examples/ws_chat in a real browser: chromium tabs whose websockets sit on different
uvicorn workers see each other's messages, carried between the workers by workerbus.

Skipped only where Debian's chromium and chromium-driver are not installed
(scripts/setup.sh installs them).
"""

from __future__ import annotations

import pathlib

import pytest

from tests.browser import (
    chat_server,
    chromium,
    find_chromium,
    open_tabs_on_distinct_workers,
    screenshot,
    send_message,
    wait_for_message,
)

pytestmark = pytest.mark.slow

WORKERS = 4


@pytest.fixture(autouse=True)
def _needs_chromium() -> None:
    if find_chromium() is None:
        pytest.skip("chromium and chromium-driver are not installed (bash scripts/setup.sh)")


@pytest.mark.parametrize(
    "app",
    [
        "examples.ws_chat.app:app",  # workerbus's own API
        "examples.ws_chat.broadcast_app:app",  # broadcaster's API, workerbus underneath
    ],
)
def test_a_message_reaches_tabs_on_every_worker(app: str) -> None:
    with chat_server(WORKERS, app) as url, chromium() as driver:
        tabs = open_tabs_on_distinct_workers(driver, url, want=2)
        assert all(0 <= worker < WORKERS for worker, _ in tabs.values()), tabs
        # One worker id, one process: the page's ids name real, different workers.
        pids: dict[int, int] = {}
        for worker, pid in tabs.values():
            assert pids.setdefault(worker, pid) == pid, tabs
        assert len(set(pids.values())) == len(pids) >= 2

        # A message from each of two tabs on different workers reaches every tab, marked
        # with the worker it came through.
        senders = {worker: handle for handle, (worker, _) in tabs.items()}
        for n, (worker, sender) in enumerate(list(senders.items())[:2]):
            text = f"message {n} from a tab on worker {worker}"
            driver.switch_to.window(sender)
            send_message(driver, text)
            for handle in tabs:
                driver.switch_to.window(handle)
                shown = wait_for_message(driver, text)
                assert shown.startswith(f"via worker {worker}"), shown


def test_the_readme_screenshot_is_made_from_two_tabs_on_two_workers(tmp_path: pathlib.Path) -> None:
    # What `python -m tests.browser docs/img/ws-chat.png` runs; it checks the tabs itself.
    png = tmp_path / "ws-chat.png"
    screenshot(str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
