"""A real browser (Debian's chromium, driven by selenium through chromium-driver) against
examples/ws_chat served by ``uvicorn --workers N``.

Used by tests/test_ws_chat_browser.py, and runnable to make the README's screenshot:

    .venv/bin/python -m tests.browser docs/img/ws-chat.png

Every wait is bounded; drivers quit and the server's process group is stopped on the way
out, however it is left.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.servers import ROOT

BIN = os.path.dirname(sys.executable)
#: Flags that work as root, headless, with no network (nothing phones home).
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=900,700",
)


def find_chromium() -> tuple[str, str] | None:
    """(chromium, chromedriver) paths, or None when either is not installed."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@contextmanager
def chromium() -> Iterator[WebDriver]:
    """A headless chromium with a fresh profile; quit (and the profile removed) on exit."""
    found = find_chromium()
    if found is None:
        raise RuntimeError("chromium and chromium-driver are not installed")
    browser, driver_path = found
    profile = tempfile.mkdtemp(prefix="wb-chromium-")
    try:
        options = webdriver.ChromeOptions()
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        options.binary_location = browser
        # An explicit driver path: selenium then never looks for (or downloads) one itself.
        service = Service(driver_path, log_output=subprocess.DEVNULL)
        driver = webdriver.Chrome(options=options, service=service)
        try:
            driver.set_page_load_timeout(20)
            driver.set_script_timeout(20)
            yield driver
        finally:
            driver.quit()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def _tool(name: str) -> str:
    """The venv's copy of a server command, else the one on PATH."""
    path = os.path.join(BIN, name)
    return path if os.path.exists(path) else name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def chat_server(
    workers: int, app: str = "examples.ws_chat.app:app", server: str = "uvicorn"
) -> Iterator[str]:
    """``uvicorn APP --workers N`` on a loopback port; yields its base URL.

    ``server="hypercorn-trio"`` runs it under hypercorn's trio workers instead.
    """
    tmp = tempfile.mkdtemp(prefix="wb-wschat-")
    port = free_port()
    env = {
        **os.environ,
        "WORKERBUS_ADDRESS": f"unix:{os.path.join(tmp, 'bus.sock')}",
        "WORKERBUS_WORKERS": str(workers),
        "PYTHONUNBUFFERED": "1",
    }
    if server == "uvicorn":
        argv = [_tool("uvicorn"), app, "--workers", str(workers), "--host", "127.0.0.1",
                "--port", str(port), "--log-level", "warning"]
    elif server == "hypercorn-trio":
        argv = [_tool("hypercorn"), "--workers", str(workers), "--worker-class", "trio",
                "--bind", f"127.0.0.1:{port}", app]
    else:
        raise ValueError(f"unknown server {server!r}")
    log_path = os.path.join(tmp, "log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 30
        while not _listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                with open(log_path, errors="replace") as f:
                    raise RuntimeError(f"{server} did not listen on {port}:\n{f.read()[-3000:]}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Workers of a group whose master exited first go with SIGKILL too.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(tmp, ignore_errors=True)


def page_worker(driver: WebDriver, timeout: float = 15.0) -> tuple[int, int]:
    """(worker id, pid) that the current page shows once its websocket said hello."""

    def shown(d: WebDriver) -> tuple[int, int] | Literal[False]:
        body = d.find_element("tag name", "body")
        worker, pid = body.get_attribute("data-worker"), body.get_attribute("data-pid")
        return (int(worker), int(pid)) if worker and pid else False

    return WebDriverWait(driver, timeout).until(shown)


def send_message(driver: WebDriver, text: str) -> None:
    box = driver.find_element("id", "text")
    box.send_keys(text, Keys.ENTER)


def wait_for_message(driver: WebDriver, text: str, timeout: float = 15.0) -> str:
    """The text of the list item that shows ``text`` (bounded wait)."""

    def found(d: WebDriver) -> str | Literal[False]:
        for item in d.find_elements("css selector", "#messages li"):
            if item.text.endswith(text):
                return str(item.text)
        return False

    return WebDriverWait(driver, timeout).until(found)


def open_tabs_on_distinct_workers(
    driver: WebDriver, url: str, want: int, attempts: int = 12
) -> dict[str, tuple[int, int]]:
    """Open tabs of ``url`` until ``want`` distinct workers hold their websockets.

    Returns {window handle: (worker id, pid)} for every tab opened (at most ``attempts``);
    raises when the kernel kept handing the connections to fewer workers.
    """
    tabs: dict[str, tuple[int, int]] = {}
    for n in range(attempts):
        if n:
            driver.switch_to.new_window("tab")
        driver.get(url + "/")
        tabs[driver.current_window_handle] = page_worker(driver)
        if len({worker for worker, _ in tabs.values()}) >= want:
            return tabs
    raise AssertionError(f"{attempts} tabs landed on workers {sorted(set(tabs.values()))} only")


def screenshot(path: str, workers: int = 4) -> None:
    """Two tabs on two different workers after a message from each, side by side in one PNG.

    Each tab is photographed on its own; a third page lays the two pictures out, and is
    photographed in turn (no image library needed).
    """
    with chat_server(workers) as url, chromium() as driver:
        d = driver
        d.set_window_size(560, 420)
        tabs = open_tabs_on_distinct_workers(d, url, 2)
        by_worker = {worker: handle for handle, (worker, _) in tabs.items()}
        left, right = list(by_worker.values())[:2]
        lines = ("hello from the tab on the left", "and hi from the one on the right")
        for handle, text in zip((left, right), lines, strict=True):
            d.switch_to.window(handle)
            send_message(d, text)
            wait_for_message(d, text)
        shots = []
        for handle in (left, right):
            d.switch_to.window(handle)
            wait_for_message(d, lines[-1])
            shots.append(d.get_screenshot_as_base64())
        d.switch_to.new_window("tab")
        d.set_window_size(1150, 460)
        d.execute_script(
            "document.body.style.cssText = 'margin:0;padding:8px;background:#9aa;display:flex;gap:8px;overflow:hidden';"
            "for (const s of arguments[0]) {"
            "  const img = document.createElement('img');"
            "  img.src = 'data:image/png;base64,' + s; img.style.cssText = 'border:1px solid #555;width:calc(50% - 6px)';"
            "  document.body.append(img); }",
            shots,
        )
        d.save_screenshot(path)


def main() -> None:
    parser = argparse.ArgumentParser(description="Screenshot two ws_chat clients on two workers.")
    parser.add_argument("png", help="where to write the PNG")
    args = parser.parse_args()
    if find_chromium() is None:
        sys.exit("error: chromium and chromium-driver are not installed (bash scripts/setup.sh)")
    screenshot(args.png)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
