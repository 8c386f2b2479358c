"""A real headless browser (Debian's Chromium) and web services on 127.0.0.1 for the browsing tests.

`render(url)` loads a page in `chromium --headless`, lets its scripts run (virtual time) and returns the DOM
they built; `screenshot(url, png)` saves what a user would see, when $TUNE_BIR_SCREENSHOTS names a folder for
a person to look at them (each screenshot is one more browser start). `serve(cmd, url)` starts a web service in a
session of its own, waits until `url` answers, and stops exactly that session afterwards (also on failure).
`.ci/run` installs Chromium (`apt-get install chromium`) where it is missing.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

PAGE_BUDGET_MS = 20_000       # virtual time for a page's scripts and requests
PAGE_TIMEOUT_S = 300.0        # wall clock for one page on a loaded machine (seconds on a quiet one)
WINDOW = "1600,1000"
SCREENSHOTS_ENV = "TUNE_BIR_SCREENSHOTS"   # a folder to keep the screenshots in (default: the test's tmp_path)


def chromium() -> str:
    """The Chromium binary; a test without it fails in CI (.ci/run installs it) and is skipped elsewhere."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "Chromium is not installed (apt-get install chromium; .ci/run does it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def _chromium(url: str, *action: str, window: str = WINDOW,
              budget_ms: int = PAGE_BUDGET_MS) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
               "--disable-extensions", f"--user-data-dir={profile}", f"--window-size={window}",
               f"--virtual-time-budget={budget_ms}", *action, url]
        # a session of its own: on a timeout the browser's renderer and GPU processes go with it
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
        try:
            out, err = process.communicate(timeout=PAGE_TIMEOUT_S)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if process.returncode != 0:
            raise subprocess.CalledProcessError(process.returncode, cmd, out, err)
        return subprocess.CompletedProcess(cmd, process.returncode, out, err)


def render(url: str, window: str = WINDOW, budget_ms: int = PAGE_BUDGET_MS) -> str:
    """The page's DOM after its scripts ran (pages draw only what fits the window: a tall one draws more)."""
    return _chromium(url, "--dump-dom", window=window, budget_ms=budget_ms).stdout


def text(dom: str) -> str:
    """The words a page shows: its DOM without tags, blanks collapsed."""
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


def screenshot(url: str, png: Path | None, window: str = WINDOW, budget_ms: int = PAGE_BUDGET_MS) -> Path | None:
    """A PNG of the page as a user sees it, for a person to look at (None: not asked for, nothing done)."""
    if png is None:
        return None
    _chromium(url, f"--screenshot={png}", window=window, budget_ms=budget_ms)
    assert png.is_file() and png.stat().st_size > 10_000, f"no screenshot of {url}"
    return png


def screenshot_dir() -> Path | None:
    """Where to keep screenshots: $TUNE_BIR_SCREENSHOTS; unset (CI), the tests check the pages' DOM only."""
    if not os.environ.get(SCREENSHOTS_ENV):
        return None
    folder = Path(os.environ[SCREENSHOTS_ENV])
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def serve(cmd: list[str], url: str, cwd: Path, timeout: float = 180.0) -> Iterator[None]:
    """Run a web service until the block ends; `url` must answer first."""
    log = open(cwd / f"{Path(cmd[0]).name}-{os.getpid()}.log", "w")   # noqa: SIM115 (closed below)
    process = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    raise RuntimeError(f"{cmd[0]} did not answer at {url}:\n"
                                       + Path(log.name).read_text()[-2000:]) from None
                time.sleep(0.5)
        yield
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)   # its own session: the service and its workers only
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=15)
        log.close()
