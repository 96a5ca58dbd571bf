"""The whole collaboration story in headless Chromium (SQLite only): an owner
makes a folder, adds a study to it from the study page and invites a new
person by e-mail address and an existing member by name; the new person
accepts the invitation, makes an account and sees the study and its image;
the owner shares it by a link with a passcode, a stranger opens it, the owner
revokes it and it stops working; the study's access history lists each step."""

from __future__ import annotations

import re
import time
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
    images_loaded,
    link_is_gone,
    open_with_passcode,
    revoke_share,
    shot,
    sign_in,
)
from tests.conftest import RunningServer, make_settings, serving
from tests.factories import ROOT, ct_dataset, stow_body, to_bytes
from tests.grants import grant

OWNER, MEMBER, NEWCOMER = "olga", "gus", "quinn"
PASSWORD = "tumour board secret"
NEW_PASSWORD = "seen the scans 42"
EMAIL = "quinn@hospital.example"
FOLDER = "Tumour board"
PASSCODE = "amber-58"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, str]]:
    """A server on SQLite (no SMTP) with one study stored by the administrator,
    owned by the member olga through a folder; gus is another member."""
    data: Path = tmp_path_factory.mktemp("collaboration-browser") / "data"
    archive = Archive.open(make_settings(data, f"sqlite:///{data / 'index.sqlite'}"))
    try:
        for name in (OWNER, MEMBER):
            auth.add_user(archive, name, PASSWORD, is_admin=False)
        with serving(archive) as running:
            study = str(generate_uid(prefix=ROOT))
            series = str(generate_uid(prefix=ROOT))
            parts = [to_bytes(ct_dataset(study=study, series=series, instance_number=i + 1,
                                         size=64)) for i in range(2)]
            body, content_type = stow_body(parts)
            stored = httpx.post(running.dicomweb + "/studies", content=body, timeout=60,
                                headers={**running.headers, "Content-Type": content_type})
            assert stored.status_code == 200, stored.text
            grant(archive, OWNER, study, role="owner")
            yield running, study
    finally:
        archive.close()


WHITE = "rgb(255, 255, 255)"


def _colour(locator: Any) -> str:
    return str(locator.evaluate("element => getComputedStyle(element).color"))


def _history(page: Any, study: str, wanted: set[str], seconds: float = 5.0) -> list[str]:
    """The study page's access history as ``who|what`` rows, reloaded until it
    holds every ``what`` in ``wanted`` (views are written about once a second)."""
    deadline = time.monotonic() + seconds
    while True:
        page.goto(f"/browse/studies/{study}")
        rows: list[str] = page.eval_on_selector_all(
            "#history tbody tr",
            "rows => rows.map(r => r.cells[1].textContent.trim() + '|'"
            " + r.cells[2].textContent.trim())",
        )
        if wanted <= {row.split("|", 1)[1] for row in rows} or time.monotonic() > deadline:
            return rows
        time.sleep(0.25)


def test_owner_invites_shares_and_revokes(browser: Any, site: tuple[RunningServer, str]) -> None:
    server, study = site
    owner = sign_in(browser, server.url, OWNER, PASSWORD)
    newcomer_context = browser.new_context(base_url=server.url,
                                           viewport={"width": 1280, "height": 900})
    stranger_context = browser.new_context(viewport={"width": 390, "height": 844})
    member = None
    try:
        # The owner makes a folder and adds the study from the study page.
        owner.goto("/folders")
        owner.fill('input[name="name"]', FOLDER)
        owner.get_by_role("button", name="Create folder").click()
        owner.wait_for_url(re.compile(r"/folders/[^/]+$"))
        folder = owner.url.rsplit("/", 1)[1]
        assert owner.locator("h1.page-title").inner_text() == FOLDER
        assert owner.locator("#role").inner_text() == "owner"

        owner.goto(f"/browse/studies/{study}")
        add = owner.locator("#add-to-folder").get_by_role("button", name=FOLDER)
        assert _colour(add) != WHITE  # link-style buttons on white cards are readable
        assert _colour(owner.get_by_role("button", name="Sign out")) == WHITE  # dark bar
        add.click()
        owner.wait_for_url(f"**/browse/studies/{study}")
        assert owner.locator("#folders").get_by_role("link", name=FOLDER).count() == 1
        shot(owner, "collab-study-added-to-folder")

        # Invites: a new person by e-mail address (the link is shown: no SMTP
        # here), an existing member by user name (a collaborator at once).
        owner.goto(f"/folders/{folder}")
        assert owner.locator("tr.study").count() == 1
        invite = owner.locator("form#invite")
        invite.locator('input[name="who"]').fill(EMAIL)
        invite.locator('select[name="role"]').select_option("viewer")
        invite.get_by_role("button", name="Invite").click()
        owner.wait_for_selector("#invite-url")
        assert f"{EMAIL} is invited" in owner.locator("#invited").inner_text()
        invitation = owner.locator("#invite-url").inner_text().strip()
        assert invitation.startswith(server.url + "/invite/")
        shot(owner, "collab-invitation-link")

        invite = owner.locator("form#invite")
        invite.locator('input[name="who"]').fill(MEMBER)
        invite.locator('select[name="role"]').select_option("viewer")
        invite.get_by_role("button", name="Invite").click()
        owner.wait_for_selector("#notice")
        assert owner.locator("#notice").inner_text() == f"{MEMBER} is now viewer of this folder."
        members = owner.locator("#collaborators tbody tr").all_inner_texts()
        assert any(row.startswith(MEMBER) for row in members), members
        shot(owner, "collab-members")

        # The new person accepts, makes an account, and lands on their folders.
        newcomer = newcomer_context.new_page()
        newcomer.goto(invitation)
        assert newcomer.get_by_text(f"{OWNER} invites {EMAIL} to the folder").is_visible()
        newcomer.fill('input[name="username"]', NEWCOMER)
        newcomer.fill('input[name="password"]', NEW_PASSWORD)
        newcomer.fill('input[name="password2"]', NEW_PASSWORD)
        shot(newcomer, "collab-invitation-accept")
        newcomer.get_by_role("button", name="Create account and join").click()
        newcomer.wait_for_url("**/folders")
        assert newcomer.get_by_role("link", name=FOLDER).count() == 1
        assert newcomer.get_by_role("link", name=f"for {OWNER}").count() == 0
        newcomer.get_by_role("link", name=FOLDER).click()
        newcomer.wait_for_url(f"**/folders/{folder}")
        assert newcomer.locator("#role").inner_text() == "viewer"
        assert newcomer.locator("tr.study").count() == 1
        shot(newcomer, "collab-newcomer-folder")
        newcomer.locator("tr.study a").first.click()
        newcomer.wait_for_url(f"**/browse/studies/{study}")
        assert images_loaded(newcomer) == 1
        assert newcomer.locator("#history").count() == 0  # for owners only
        shot(newcomer, "collab-newcomer-study")
        used = newcomer_context.new_page().goto(invitation)
        assert used is not None and used.status == 404  # an invitation works once

        # The member invited by name sees the folder too.
        member = sign_in(browser, server.url, MEMBER, PASSWORD)
        member.goto("/folders")
        assert member.get_by_role("link", name=FOLDER).count() == 1

        # A link with a passcode, opened by a stranger, then revoked.
        url, link_id = create_share_link(owner, study, PASSCODE, name="collab-share")
        stranger = stranger_context.new_page()
        assert open_with_passcode(stranger, url, PASSCODE, name="collab-share") == 1
        shot(stranger, "collab-share-open")
        revoke_share(owner, link_id, name="collab-share")
        stranger.reload()
        link_is_gone(stranger, url)
        shot(stranger, "collab-share-gone")

        # The owner's study page lists each step.
        steps = {"folder_add_study", "share_create", "share_unlock (failure)", "share_unlock",
                 "share_open", "view", "share_revoke"}
        rows = _history(owner, study, steps)
        shot(owner, "collab-access-history")
        assert steps <= {row.split("|", 1)[1] for row in rows}, rows
        assert f"{OWNER}|folder_add_study" in rows
        holder, link = f"link:{link_id}", f"(link {link_id})"
        for who, what in ((OWNER, "share_create"), (holder, "share_unlock (failure)"),
                          (holder, "share_unlock"), (holder, "share_open"), (holder, "view"),
                          (OWNER, "share_revoke")):
            assert f"{who} {link}|{what}" in rows, (who, what, rows)
    finally:
        stranger_context.close()
        newcomer_context.close()
        if member is not None:
            member.context.close()
        owner.context.close()
