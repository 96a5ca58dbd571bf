"""Headless Chromium for the browser tests, driven by Playwright.

The browser is Debian's ``/usr/bin/chromium`` (Playwright never downloads its
own). Screenshots of each step go to ``test-artifacts/`` (not in git).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("LIGHTBOX_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]


def chromium_available() -> bool:
    return shutil.which(CHROMIUM) is not None or Path(CHROMIUM).exists()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """One Chromium per test module (each test takes a fresh context); closed at the
    module's end so Playwright's event loop never outlives it into asyncio tests."""
    if not chromium_available():
        pytest.fail(f"Chromium not found at {CHROMIUM}: run scripts/system-deps.sh")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()


def shot(page: object, name: str) -> Path:
    """Keep a screenshot of this step as a test artefact."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".png")
    page.screenshot(path=str(path), full_page=True)  # type: ignore[attr-defined]
    return path


def sign_in(browser: object, base_url: str, name: str, password: str) -> object:
    """A fresh browser context signed in through the login page; returns its page."""
    context = browser.new_context(  # type: ignore[attr-defined]
        base_url=base_url, viewport={"width": 1280, "height": 900}
    )
    page = context.new_page()
    page.goto("/login")
    page.fill('input[name="username"]', name)
    page.fill('input[name="password"]', password)
    page.click('button[type="submit"]')
    page.wait_for_load_state()
    return page
