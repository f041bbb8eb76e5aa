"""The explorer in a real browser: `bganalysis app` as a subprocess, Debian's Chromium through Playwright.

Screenshots go to a temporary folder; with BGANALYSIS_DOCS_SCREENSHOTS=1 they go to
docs/figures/app_*.png, and BGANALYSIS_SCREENSHOT_RUNS=runs takes them on runs/demo
instead of the fixture runs (how docs/app.md's pictures are made).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.app_runs import app_runs  # noqa: F401  (session fixture)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PAGES = {"runs": "Runs", "token_map": "Token map", "exposure_bias": "Exposure bias", "risk": "Risk",
         "benchmarks": "Benchmarks"}
VIEWPORT = {"width": 1400, "height": 1500}
DOCS_FIGURES = Path(__file__).resolve().parent.parent / "docs" / "figures"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (make test installs it)")]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"bganalysis app exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"bganalysis app did not answer at {url} within {timeout_s:.0f} s")


@pytest.fixture(scope="module")
def server(app_runs):
    screenshot_runs = os.environ.get("BGANALYSIS_SCREENSHOT_RUNS")
    root, run = (Path(screenshot_runs), "demo") if screenshot_runs else (app_runs, "good")
    port = free_port()
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "bganalysis", "app", str(root), "--port", str(port)],
                               env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        yield url, run
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


def screenshot_folder(tmp_path: Path) -> Path:
    return DOCS_FIGURES if os.environ.get("BGANALYSIS_DOCS_SCREENSHOTS") == "1" else tmp_path


def assert_not_blank(path: Path) -> None:
    from PIL import Image

    pixels = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert pixels.std() > 10, f"{path} looks blank (grey-level spread {pixels.std():.1f})"
    assert len(np.unique(pixels)) > 50


def test_token_map_select_token(server, browser, tmp_path):
    url, run = server
    page = browser.new_page(viewport=VIEWPORT)
    page.goto(f"{url}/?page=Token+map&run={run}", timeout=120_000)
    page.wait_for_selector("a.tok", timeout=120_000)
    tokens = page.locator("a.tok")
    assert tokens.count() >= 5
    token_text = tokens.nth(3).inner_text()

    page.evaluate("window.bganalysisMarker = 'before the click'")
    started = time.monotonic()
    tokens.nth(3).click()
    page.wait_for_selector("a.tok.selected#tok-3", timeout=60_000)
    page.get_by_text("Position 3:").wait_for(timeout=60_000)
    selection_seconds = time.monotonic() - started
    assert page.evaluate("window.bganalysisMarker") == "before the click"  # selected by a rerun, not a page reload

    details = page.locator("[data-testid='stMain']").inner_text()
    assert "kappa ± standard error (nats)" in details
    assert "true role (lab)" in details and "Loss-to-go of each forced action" in details
    assert "pos=3" in page.url
    assert token_text.strip() in page.get_by_text("Position 3:").inner_text()
    assert page.locator("[data-testid='stException']").count() == 0

    path = screenshot_folder(tmp_path) / "app_token_map.png"
    page.screenshot(path=str(path), full_page=True)
    assert_not_blank(path)
    print(f"token selection rendered in {selection_seconds:.2f} s")  # shown with pytest -s
    page.close()


@pytest.mark.parametrize("slug", [slug for slug in PAGES if slug != "token_map"])
def test_page_renders(server, browser, tmp_path, slug):
    url, run = server
    page = browser.new_page(viewport=VIEWPORT)
    page.goto(f"{url}/?page={PAGES[slug].replace(' ', '+')}&run={run}", timeout=120_000)
    page.get_by_role("heading", name=PAGES[slug]).first.wait_for(timeout=120_000)
    page.wait_for_selector("[data-testid='stDataFrame'], [data-testid='stAlert']", timeout=120_000)
    page.wait_for_load_state("networkidle")
    assert page.locator("[data-testid='stException']").count() == 0
    path = screenshot_folder(tmp_path) / f"app_{slug}.png"
    page.screenshot(path=str(path), full_page=True)
    assert_not_blank(path)
    page.close()
