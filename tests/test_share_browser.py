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
from tests.browser import (
    create_share_link,
    link_is_gone,
    open_with_passcode,
    revoke_share,
    shot,
    sign_in,
)
from tests.conftest import RunningServer, make_settings, serving
from tests.factories import ROOT, ct_dataset, stow_body, to_bytes
from tests.grants import grant

OWNER, PASSWORD = "owner", "share the studies"
PASSCODE = "violet-73"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, str]]:
    """A server on SQLite with one two-series study and its owner (a member
    who owns a folder holding it)."""
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
            grant(archive, OWNER, study, role="owner")  # members see their folders' studies
            yield running, study
    finally:
        archive.close()


def test_share_link_round_trip(browser: Any, site: tuple[RunningServer, str]) -> None:
    server, study = site
    owner = sign_in(browser, server.url, OWNER, PASSWORD)
    stranger_context = browser.new_context(viewport={"width": 390, "height": 844})
    try:
        url, link_id = create_share_link(owner, study, PASSCODE)
        assert url.startswith(server.url + "/s/")
        stranger = stranger_context.new_page()
        assert open_with_passcode(stranger, url, PASSCODE) == 2
        assert stranger.locator(".qr svg").count() == 1
        assert stranger.get_by_text("Download ZIP").is_visible()
        shot(stranger, "share-page-phone")

        actions = revoke_share(owner, link_id)
        for wanted in ("share_create:success", "share_unlock:failure", "share_unlock:success",
                       "share_open:success", "share_revoke:success"):
            assert wanted in actions, (wanted, actions)

        link_is_gone(stranger, url)
        gone = stranger.request.get(url + f"/dicom-web/studies/{study}/metadata")
        assert gone.status == 404
        shot(stranger, "share-after-revoke")
    finally:
        stranger_context.close()
        owner.context.close()
