"""Helpers for the browser tests: start the real app on a free local port, drive Debian's Chromium.

The app runs as a child process (``python app.py``) with its own database in a temporary data
folder. The browser loads pages from 127.0.0.1 only: any other request is aborted, so a test
never reaches the network.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("HSCR_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_path() -> str | None:
    """Return the Chromium executable, or None when it is not installed."""
    if Path(CHROMIUM).is_file():
        return CHROMIUM
    return shutil.which("chromium")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AppProcess:
    """``python app.py`` as a child process in its own process group, stopped with SIGTERM."""

    def __init__(self, db: Path, model: Path | str, extra_args: list[str] | None = None, port: int | None = None):
        self.db = Path(db)
        self.model = str(model)
        self.port = port or free_port()
        self.extra_args = list(extra_args or [])
        self.log_path = self.db.parent / f"app-{self.port}.log"
        self.process: subprocess.Popen | None = None
        self.prefix: list[str] = []          # a wrapper command to start the app under (setpriv, unshare)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self, timeout: float = 90.0) -> "AppProcess":
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        command = [*self.prefix, sys.executable, str(REPO / "app.py"), "--model", self.model, "--db", str(self.db),
                   "--port", str(self.port), *self.extra_args]
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the app exited with code {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"the app did not answer on {self.url} within {timeout:.0f} s:\n{self.log()}")

    def stop(self, timeout: float = 20.0) -> int | None:
        """Send SIGTERM to the app's process group and wait; SIGKILL if it does not stop."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def __enter__(self) -> "AppProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def launch_chromium(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)


def local_only(page: Any) -> list[str]:
    """Abort every request that does not go to 127.0.0.1 or localhost; returns the aborted URLs."""
    blocked: list[str] = []

    def route(route_request: Any) -> None:
        url = route_request.request.url
        if url.startswith(("http://127.0.0.1", "http://localhost", "ws://127.0.0.1", "data:", "blob:")):
            route_request.continue_()
        else:
            blocked.append(url)
            route_request.abort()

    page.route("**/*", route)
    return blocked


def open_tab(page: Any, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def fill(page: Any, elem_id: str, text: str, submit: bool = False) -> None:
    """Type into the textbox or number field inside the element with ``elem_id``."""
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.wait_for(state="visible")
    box.fill(text)
    box.dispatch_event("input")
    if submit:
        box.press("Enter")
    else:
        box.blur()


def wait_idle(page: Any, timeout: float = 30_000) -> None:
    """Wait until Gradio shows no pending event (no progress bar or spinner)."""
    page.wait_for_function(
        "() => !document.querySelector('.progress-text, .eta-bar, .wrap.pending, .generating')",
        timeout=timeout,
    )


def click_row(page: Any, elem_id: str, text: str) -> None:
    """Click the first visible row of a Gradio dataframe that contains ``text``.

    Gradio 6 draws the rows as ``div.virtual-row`` and keeps a hidden ``<table>`` copy for
    measuring column widths, so a plain text or ``td`` locator can pick the hidden copy.
    """
    row = page.locator(f"#{elem_id} .virtual-row").filter(has_text=text).first
    row.locator(".body-cell").first.click()


def open_app(page: Any, url: str, attempts: int = 3, timeout: float = 60_000) -> None:
    """Load the app page, reloading when the Gradio frontend stays on its loading screen.

    NOTE: on a heavily loaded machine Chromium sometimes never receives some of the frontend's
    script responses, so the page stays on "Loading...". A reload recovers it.
    """
    for attempt in range(attempts):
        page.goto(url)
        try:
            page.locator("#main-tabs").wait_for(state="visible", timeout=timeout)
            return
        except Exception:  # playwright's TimeoutError; the last attempt re-raises below
            if attempt == attempts - 1:
                raise
