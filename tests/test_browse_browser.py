"""The study browser in headless Chromium: sign in, search, a study page with
its thumbnails, and the same pages on a phone-sized screen (SQLite only)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from lightbox.archive import Archive
from lightbox.cli.importer import import_paths
from lightbox.samples import SAMPLES, write_samples
from lightbox.services import auth
from tests.browser import shot, sign_in
from tests.conftest import RunningServer, make_settings, serving
from tests.grants import grant

NAME, PASSWORD = "radiologist", "browse the studies"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server on SQLite with the demo patients and a signed-up user."""
    root = tmp_path_factory.mktemp("browse-demo")
    data = root / "data"
    archive = Archive.open(make_settings(data, f"sqlite:///{data / 'index.sqlite'}"))
    try:
        files = list(write_samples(root / "samples"))
        summary = import_paths(archive, [Path(f) for f in files], progress=False)
        assert summary is not None
        auth.add_user(archive, NAME, PASSWORD, is_admin=False)
        studies = {str(dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files}
        grant(archive, NAME, *sorted(studies))  # a member sees their folders' studies
        with serving(archive) as running:
            yield running
    finally:
        archive.close()


def _study_links(page: Any) -> list[str]:
    hrefs = page.eval_on_selector_all(
        "table.studies a[href^='/browse/studies/']", "links => links.map(a => a.pathname)"
    )
    return list(dict.fromkeys(hrefs))


def test_search_open_study_and_see_thumbnails(browser: Any, demo: RunningServer) -> None:
    page = sign_in(browser, demo.url, NAME, PASSWORD)
    try:
        page.goto("/browse")
        for sample in SAMPLES:
            assert page.get_by_text(sample.patient_id).first.is_visible()
        assert len(_study_links(page)) == len(SAMPLES)
        shot(page, "browse-list")

        page.fill('input[name="name"]', "demo^he")
        page.click('form.search button[type="submit"]')
        page.wait_for_load_state()
        assert len(_study_links(page)) == 1
        assert "1\u20131 of 1 study" in page.inner_text("#summary")
        shot(page, "browse-filtered")

        page.click("table.studies a[href^='/browse/studies/']")
        page.wait_for_load_state()
        assert "Head phantom T1" in page.content()
        thumb = page.locator("img.thumb").first
        thumb.scroll_into_view_if_needed()
        page.wait_for_function(
            "() => [...document.images].filter(i => i.classList.contains('thumb'))"
            ".every(i => i.complete && i.naturalWidth > 0)"
        )
        assert page.locator("table.dump td.tag", has_text="(0010,0010)").count() == 1
        assert page.locator('form[action="/key-images"]').count() >= 1
        assert page.locator("text=Delete study").count() == 0  # not an administrator
        shot(page, "browse-study")
    finally:
        page.context.close()


def _overflows(page: Any) -> bool:
    return bool(page.evaluate(
        "() => document.documentElement.scrollWidth > window.innerWidth"
        " || document.body.scrollWidth > window.innerWidth"
    ))


def test_pages_fit_a_phone(browser: Any, demo: RunningServer) -> None:
    page = sign_in(browser, demo.url, NAME, PASSWORD)
    try:
        page.set_viewport_size({"width": 390, "height": 844})
        page.goto("/browse")
        assert len(_study_links(page)) == len(SAMPLES)
        assert not _overflows(page)
        shot(page, "browse-list-phone")
        page.click("table.studies a[href^='/browse/studies/']")
        page.wait_for_load_state()
        page.wait_for_function(
            "() => [...document.images].filter(i => i.classList.contains('thumb'))"
            ".every(i => i.complete && i.naturalWidth > 0)"
        )
        assert not _overflows(page)
        shot(page, "browse-study-phone")
    finally:
        page.context.close()
