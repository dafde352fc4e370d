"""The browser fixtures of the page's tests: `vitune ui` in its own process on a workspace holding
the bundled data/ and runs/tiny-llama, and Debian's Chromium, headless, driven by Playwright
(pointed at /usr/bin/chromium: no browser is downloaded). Test modules import the fixtures
they use (`from browser_fixtures import ...`); each module gets its own server.

`make test` installs Chromium (Debian's package) when it is missing. VITUNE_UI_SCREENSHOTS=DIR
saves a screenshot of each tab there (docs/assets/ holds the documentation's:
`VITUNE_UI_SCREENSHOTS=docs/assets python -m pytest tests/test_ui_browser.py tests/test_ui_chat_browser.py`).
"""


from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, write_jsonl

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# resolved now: the tests change the working folder to the UI's
SHOTS = Path(os.environ["VITUNE_UI_SCREENSHOTS"]).resolve() if os.environ.get("VITUNE_UI_SCREENSHOTS") else None

if not Path(CHROMIUM).is_file():
    if os.environ.get("CI"):  # CI must run these: a missing browser is a failure there, not a skip
        raise RuntimeError("Chromium is missing: `make test` installs Debian's chromium package")
    pytest.skip("Chromium is not installed (make test installs Debian's chromium package)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


WORKSPACE: Path | None = None  # the UI's working folder (the workspace fixture)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """The UI's working folder, holding the bundled data/ and the run folders (runs/): every path
    typed into the page is relative to it, so the screenshots show no path of this machine."""
    global WORKSPACE
    WORKSPACE = tmp_path_factory.mktemp("ui")
    shutil.copytree(ROOT / "data", WORKSPACE / "data")
    return WORKSPACE


@pytest.fixture(scope="module")
def root(workspace) -> Path:
    root = workspace / "runs"
    root.mkdir()
    subprocess.run([sys.executable, "-m", "vitune", "init-model", "--arch", "llama", "--out", str(root / "tiny-llama")],
                   check=True, capture_output=True, cwd=ROOT)
    return root


@pytest.fixture(scope="module")
def server(root):
    port = free_port()
    log = open(root.parent / "ui.log", "w")
    # the page's own files (the YAML of the runs it starts) go to its state folder, beside the runs folder
    proc = subprocess.Popen([sys.executable, "-m", "vitune", "ui", "--root", rel(root), "--port", str(port), "--lang", "en",
                             "--state-dir", str(root.parent / "state")],
                            cwd=root.parent, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"vitune ui exited {proc.returncode}: {(root.parent / 'ui.log').read_text()}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=20)
    log.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(server)
    yield page
    page.close()


def shot(page, name: str) -> None:
    if SHOTS:
        SHOTS.mkdir(parents=True, exist_ok=True)
        time.sleep(1)  # plots draw after their data arrives
        page.screenshot(path=str(SHOTS / f"ui-{name}.png"), full_page=True)


def rel(path: Path) -> str:
    """A path as typed into the page: relative to the server's working folder (the workspace)."""
    return str(Path(path).relative_to(WORKSPACE))


