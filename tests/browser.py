"""A report opened in a real headless browser: Debian's /usr/bin/chromium driven by playwright
(never `playwright install`: nothing is downloaded). Other tests still open Chromium their own way;
new ones use :func:`report_page`."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@contextmanager
def report_page(path: Path, width: int = 1200, height: int = 900):
    """``(page, requested URLs)`` of the file at ``path``, loaded; the browser is closed afterwards."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found: `apt-get update && apt-get install -y chromium` (never `playwright install`)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(Path(path).resolve().as_uri())
            page.wait_for_load_state("load")
            yield page, requests
        finally:
            browser.close()
