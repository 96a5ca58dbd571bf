"""Share links in headless Chromium (SQLite only): the owner makes a link with
a passcode through the form, a stranger opens it, gets the passcode wrong and
then right, sees the study and its thumbnails; the owner revokes it, the link
stops working, and the link's history shows every step."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.uid import generate_uid

from lightbox.archive import Archive
from lightbox.services import auth
from tests.browser import shot, sign_in
from tests.conftest import RunningServer, make_settings, serving
from tests.factories import ROOT, ct_dataset, stow_body, to_bytes

OWNER, PASSWORD = "owner", "share the studies"
PASSCODE = "violet-73"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, str]]:
    """A server on SQLite with one two-series study and its owner."""
    data: Path = tmp_path_factory.mktemp("share-browser") / "data"
    archive = Archive.open(make_settings(data, f"sqlite:///{data / 'index.sqlite'}"))
    try:
        auth.add_user(archive, OWNER, PASSWORD, is_admin=False)
        with serving(archive) as running:
            study = str(generate_uid(prefix=ROOT))
            parts = [to_bytes(ct_dataset(study=study, series=series, instance_number=i + 1,
                                         SeriesNumber=n + 1, size=64))
                     for n, series in enumerate([generate_uid(prefix=ROOT)] * 1
                                                + [generate_uid(prefix=ROOT)])
                     for i in range(2)]
            body, content_type = stow_body(parts)
            stored = httpx.post(running.dicomweb + "/studies", content=body, timeout=60,
                                headers={**running.headers, "Content-Type": content_type})
            assert stored.status_code == 200, stored.text
            yield running, study
    finally:
        archive.close()


def _create_link(page: Any, study: str) -> tuple[str, str]:
    """Submit the share form from the study page (as the study page's form
    will); returns the link's URL and id from the page shown once."""
    page.goto(f"/browse/studies/{study}")
    page.evaluate(
        """([study, passcode]) => {
            const form = document.createElement("form");
            form.method = "post";
            form.action = "/shares";
            const fields = {study, passcode, expires: "7d", download: "on", access: "anyone"};
            for (const [name, value] of Object.entries(fields)) {
                const input = document.createElement("input");
                input.type = "hidden"; input.name = name; input.value = value;
                form.appendChild(input);
            }
            document.body.appendChild(form);
            form.submit();
        }""",
        [study, PASSCODE],
    )
    page.wait_for_selector("input.share-url")
    shot(page, "share-created")
    url = page.input_value("input.share-url")
    manage = page.get_attribute("a[href^='/shares/']", "href")
    assert url and manage
    return url, manage.rsplit("/", 1)[1]


def test_share_link_round_trip(browser: Any, site: tuple[RunningServer, str]) -> None:
    server, study = site
    owner = sign_in(browser, server.url, OWNER, PASSWORD)
    stranger_context = browser.new_context(viewport={"width": 390, "height": 844})
    try:
        url, link_id = _create_link(owner, study)
        assert url.startswith(server.url + "/s/")
        stranger = stranger_context.new_page()
        stranger.goto(url)
        stranger.fill('input[name="passcode"]', "not-it")
        stranger.click('button[type="submit"]')
        stranger.wait_for_selector("p.error")
        assert stranger.get_by_text("wrong passcode").is_visible()
        shot(stranger, "share-wrong-passcode")
        stranger.fill('input[name="passcode"]', PASSCODE)
        stranger.click('button[type="submit"]')
        stranger.wait_for_selector("img.thumb")
        stranger.wait_for_function(
            "() => [...document.querySelectorAll('img.thumb')]"
            ".every(img => img.complete && img.naturalWidth > 0)"
        )
        assert stranger.locator("img.thumb").count() == 2
        assert stranger.locator(".qr svg").count() == 1
        assert stranger.get_by_text("Download ZIP").is_visible()
        shot(stranger, "share-page-phone")

        owner.goto(f"/shares/{link_id}")
        owner.click("text=Revoke this link")
        owner.wait_for_selector("tr.event.share_revoke")
        shot(owner, "share-revoked-history")
        actions = owner.eval_on_selector_all(
            "tr.event",
            "rows => rows.map(r => r.cells[1].textContent + ':' + r.cells[2].textContent)",
        )
        for wanted in ("share_create:success", "share_unlock:failure", "share_unlock:success",
                       "share_open:success", "share_revoke:success"):
            assert wanted in actions, (wanted, actions)

        answer = stranger.goto(url)
        assert answer is not None and answer.status == 404
        assert stranger.get_by_text("This link is not valid").is_visible()
        gone = stranger.request.get(url + f"/dicom-web/studies/{study}/metadata")
        assert gone.status == 404
        shot(stranger, "share-after-revoke")
    finally:
        stranger_context.close()
        owner.context.close()
