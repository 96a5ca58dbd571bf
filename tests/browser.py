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


def images_loaded(page: object, selector: str = "img.thumb") -> int:
    """Wait until every image matching ``selector`` has loaded real pixels
    (complete, with a natural width); returns how many there are."""
    page.wait_for_selector(selector)  # type: ignore[attr-defined]
    page.wait_for_function(  # type: ignore[attr-defined]
        """selector => {
            const images = [...document.querySelectorAll(selector)];
            images.forEach(img => { img.loading = "eager"; });
            return images.length > 0 && images.every(img => img.complete && img.naturalWidth > 0);
        }""",
        arg=selector,
    )
    return int(page.locator(selector).count())  # type: ignore[attr-defined]


def create_share_link(page: object, study: str, passcode: str,
                      name: str = "share") -> tuple[str, str]:
    """Make a 7-day link with ``passcode`` through the study page's share form;
    returns the link's URL (shown once) and its id."""
    page.goto(f"/browse/studies/{study}")  # type: ignore[attr-defined]
    form = page.locator("#share form")  # type: ignore[attr-defined]
    form.locator('select[name="expires"]').select_option("7d")
    form.locator('input[name="passcode"]').fill(passcode)
    form.locator('select[name="access"]').select_option("anyone")
    form.get_by_role("button", name="Create link").click()
    page.wait_for_selector("input.share-url")  # type: ignore[attr-defined]
    shot(page, f"{name}-created")
    url = page.input_value("input.share-url")  # type: ignore[attr-defined]
    manage = page.get_attribute("a[href^='/shares/']", "href")  # type: ignore[attr-defined]
    assert url and manage
    return url, manage.rsplit("/", 1)[1]


def open_with_passcode(page: object, url: str, passcode: str, name: str = "share") -> int:
    """Open a share link, be refused a wrong passcode, get in with the right one;
    returns how many series thumbnails loaded."""
    page.goto(url)  # type: ignore[attr-defined]
    page.fill('input[name="passcode"]', "not-it")  # type: ignore[attr-defined]
    page.click('button[type="submit"]')  # type: ignore[attr-defined]
    page.wait_for_selector("p.error")  # type: ignore[attr-defined]
    assert page.get_by_text("wrong passcode").is_visible()  # type: ignore[attr-defined]
    shot(page, f"{name}-wrong-passcode")
    page.fill('input[name="passcode"]', passcode)  # type: ignore[attr-defined]
    page.click('button[type="submit"]')  # type: ignore[attr-defined]
    return images_loaded(page)


def revoke_share(page: object, link_id: str, name: str = "share") -> list[str]:
    """Revoke a link from its manage page; returns its history as ``action:outcome``."""
    page.goto(f"/shares/{link_id}")  # type: ignore[attr-defined]
    page.click("text=Revoke this link")  # type: ignore[attr-defined]
    page.wait_for_selector("tr.event.share_revoke")  # type: ignore[attr-defined]
    shot(page, f"{name}-revoked-history")
    return list(page.eval_on_selector_all(  # type: ignore[attr-defined]
        "tr.event",
        "rows => rows.map(r => r.cells[1].textContent + ':' + r.cells[2].textContent)",
    ))


def link_is_gone(page: object, url: str) -> None:
    """The link's page answers 404 "This link is not valid"."""
    answer = page.goto(url)  # type: ignore[attr-defined]
    assert answer is not None and answer.status == 404
    assert page.get_by_text("This link is not valid").is_visible()  # type: ignore[attr-defined]
