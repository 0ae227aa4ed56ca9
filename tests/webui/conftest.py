"""WebUI fixtures: the real berth server as a subprocess and Debian's Chromium driven by Playwright.

Tests skip cleanly when /usr/bin/chromium or the playwright package is missing (test_webui.py checks
both at import; the browser fixture checks again).
Never run `playwright install`: the browser is Debian's `chromium` package.
Set BERTH_WEBUI_URL (and BERTH_WEBUI_TOKEN_URL + BERTH_WEBUI_TOKEN) to test an already-running server.
"""
from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 120.0



def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _health_status(base_url: str) -> int:
    try:
        with urllib.request.urlopen(base_url + "/health", timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


def _start_server(tmp_dir: Path, extra_args: list[str]):
    port = _free_port()
    log_path = tmp_dir / f"server-{port}.log"
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", "default",
           "--host", "127.0.0.1", "--port", str(port), *extra_args]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while _health_status(base_url) != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc, log)
            tail = log_path.read_text(errors="replace")[-3000:]
            pytest.fail(f"server did not become healthy (exit {proc.returncode}):\n{tail}")
        time.sleep(0.5)
    return proc, log, base_url


def _stop(proc: subprocess.Popen, log) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    log.close()


@pytest.fixture(scope="session")
def server_url(tmp_path_factory):
    """Base URL of a berth server without a token (started once per session)."""
    if os.environ.get("BERTH_WEBUI_URL"):
        yield os.environ["BERTH_WEBUI_URL"].rstrip("/")
        return
    proc, log, base_url = _start_server(tmp_path_factory.mktemp("webui-server"), [])
    yield base_url
    _stop(proc, log)


@pytest.fixture(scope="session")
def token_server(tmp_path_factory):
    """(base URL, token) of a berth server started with --token."""
    if os.environ.get("BERTH_WEBUI_TOKEN_URL"):
        yield os.environ["BERTH_WEBUI_TOKEN_URL"].rstrip("/"), os.environ["BERTH_WEBUI_TOKEN"]
        return
    token = "tok-" + secrets.token_urlsafe(12)
    proc, log, base_url = _start_server(tmp_path_factory.mktemp("webui-token-server"), ["--token", token])
    yield base_url, token
    _stop(proc, log)


MNN_DOC = ("# MNN\n\nMNN is a lightweight deep learning inference engine developed by Alibaba. "
           "It runs neural network models on phones, embedded devices and servers.\n")


@pytest.fixture(scope="session")
def knowledge_server(tmp_path_factory):
    """(base URL, token) of a berth server with a private knowledge base: `--knowledge` indexes one .md
    file at start, `--knowledge-db` keeps the store in the test's tmp dir (the model cache stays shared),
    `--max-new-tokens 16` keeps answers short. The token makes the UI's authenticated fetches real."""
    tmp = tmp_path_factory.mktemp("webui-knowledge-server")
    docs = tmp / "docs"
    docs.mkdir()
    (docs / "mnn.md").write_text(MNN_DOC, encoding="utf-8")
    token = "tok-" + secrets.token_urlsafe(12)
    proc, log, base_url = _start_server(tmp, ["--token", token, "--knowledge", str(docs),
                                              "--knowledge-db", str(tmp / "kb.sqlite3"),
                                              "--max-new-tokens", "16"])
    yield base_url, token
    _stop(proc, log)


@pytest.fixture(scope="session")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is absent")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class PageProbe:
    """A fresh page plus what it reported: console errors, page errors, dialogs and requested URLs."""

    def __init__(self, page):
        self.page = page
        self.console_errors: list[str] = []
        self.dialogs: list[str] = []
        self.urls: list[str] = []
        page.on("console", lambda msg: msg.type == "error" and self.console_errors.append(msg.text))
        page.on("pageerror", lambda exc: self.console_errors.append(f"pageerror: {exc}"))
        page.on("dialog", self._on_dialog)
        page.on("request", lambda request: self.urls.append(request.url))
        page.on("websocket", lambda ws: self.urls.append(ws.url))

    def _on_dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()


@pytest.fixture
def make_page(browser):
    """Factory: make_page(viewport=None) -> PageProbe on a new browser context; all closed at teardown."""
    contexts = []

    def make(viewport: dict | None = None) -> PageProbe:
        context = browser.new_context(viewport=viewport or {"width": 1100, "height": 800})
        context.set_default_timeout(60_000)
        contexts.append(context)
        return PageProbe(context.new_page())

    yield make
    for context in contexts:
        context.close()
