"""Folders and collaborators: inboxes, roles, switches, invitations (with a
real SMTP server), the folder pages, and collaborators' share links."""

from __future__ import annotations

import email
import io
import re
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import update

from lightbox.archive import Archive
from lightbox.cli.main import main as cli
from lightbox.errors import BadRequest, Conflict, Forbidden, NotFound
from lightbox.index.invitations import invitations as invitations_table
from lightbox.services import auth, folders, invitations, sharing
from lightbox.services.folders import Role
from tests.conftest import RunningServer, free_port
from tests.factories import ct_dataset, stow_body, to_bytes
from tests.grants import grant

PASSWORD = "a long enough secret"


def _store(server: RunningServer, token: str | None = None, study: str | None = None) -> Any:
    ds = ct_dataset(study=study)
    body, content_type = stow_body([to_bytes(ds)])
    answer = httpx.post(server.dicomweb + "/studies", content=body, headers={
        "Authorization": f"Bearer {token or server.token}", "Content-Type": content_type})
    return ds, answer


def _member(server: RunningServer, name: str, **extra: Any) -> tuple[str, auth.Principal]:
    auth.add_user(server.archive, name, PASSWORD, is_admin=False, **extra)
    token = auth.create_token(server.archive, user=name)
    return token, sharing.acting_as(server.archive, name)


def _studies(server: RunningServer, token: str) -> list[str]:
    answer = httpx.get(server.dicomweb + "/studies",
                       headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code in (200, 204)
    return [s["0020000D"]["Value"][0] for s in answer.json()] if answer.status_code == 200 else []


@contextmanager
def _session(server: RunningServer, name: str) -> Iterator[httpx.Client]:
    client = httpx.Client(base_url=server.url, headers={"Origin": server.url})
    answer = client.post("/login", data={"username": name, "password": PASSWORD})
    assert answer.status_code == 303, answer.text
    try:
        yield client
    finally:
        client.close()


def test_a_member_sees_only_their_folders_and_uploads_land_in_the_inbox(
    server: RunningServer,
) -> None:
    archived, stored = _store(server)
    assert stored.status_code == 200
    token, alice = _member(server, "alice")
    other_token, _bob = _member(server, "bob")
    assert _studies(server, token) == []
    assert httpx.get(server.dicomweb + f"/studies/{archived.StudyInstanceUID}/metadata",
                     headers={"Authorization": f"Bearer {token}"}).status_code == 404
    own, answer = _store(server, token)
    assert answer.status_code == 200
    assert _studies(server, token) == [own.StudyInstanceUID]
    assert _studies(server, other_token) == []
    assert set(_studies(server, server.token)) == {archived.StudyInstanceUID,
                                                   own.StudyInstanceUID}
    inbox = [e for e in folders.list_folders(server.archive, alice) if e.folder.inbox_of]
    assert len(inbox) == 1 and inbox[0].studies == 1 and inbox[0].role == "owner"
    # Adding to someone else's study is refused and changes nothing.
    _copy, refused = _store(server, token, study=archived.StudyInstanceUID)
    assert refused.status_code == 409
    failed = refused.json()["00081198"]["Value"][0]
    assert failed["00081197"]["Value"] == [0x0124]
    assert _studies(server, token) == [own.StudyInstanceUID]
    series = httpx.get(server.dicomweb + f"/studies/{archived.StudyInstanceUID}/series",
                       headers=server.headers).json()
    assert len(series) == 1


def test_roles_decide_what_a_collaborator_may_do(server: RunningServer) -> None:
    archive = server.archive
    first, _ = _store(server)
    second, _ = _store(server)
    _t, owner = _member(server, "olga")
    _t, viewer = _member(server, "vic")
    _t, uploader = _member(server, "uma")
    _t, editor = _member(server, "ed")
    admin = sharing.acting_as(archive, None)
    folder = folders.create_folder(archive, owner, "Board").public_id
    # The owner may only add what they may pass on: nothing yet.
    with pytest.raises(NotFound):
        folders.add_studies(archive, owner, folder, [first.StudyInstanceUID])
    folders.add_studies(archive, admin, folder, [first.StudyInstanceUID])
    for principal, role in ((viewer, Role.VIEWER), (uploader, Role.UPLOADER),
                            (editor, Role.EDITOR)):
        folders.set_collaborator(archive, owner, folder, principal.user, role)
    assert viewer.may_read(first.StudyInstanceUID)
    assert not viewer.may_read(second.StudyInstanceUID)
    with pytest.raises(Forbidden):
        folders.remove_study(archive, viewer, folder, first.StudyInstanceUID)
    with pytest.raises(Forbidden):
        folders.comment(archive, uploader, folder, "looks fine")
    with pytest.raises(Forbidden):
        folders.set_collaborator(archive, editor, folder, "vic", Role.OWNER)
    folders.comment(archive, editor, folder, "see series 2", first.StudyInstanceUID)
    other = folders.create_folder(archive, editor, "Elsewhere").public_id
    with pytest.raises(Forbidden):  # out of a folder that keeps its studies to itself
        folders.move_study(archive, editor, folder, other, first.StudyInstanceUID)
    folders.update_folder(archive, owner, folder, allow_reshare=True)
    folders.move_study(archive, editor, folder, other, first.StudyInstanceUID)
    assert not viewer.may_read(first.StudyInstanceUID)
    assert editor.may_read(first.StudyInstanceUID)
    # The last owner can neither leave nor be demoted; an inbox has no collaborators.
    with pytest.raises(Conflict):
        folders.remove_collaborator(archive, owner, folder, "olga")
    with pytest.raises(Conflict):
        folders.set_collaborator(archive, owner, folder, "olga", Role.VIEWER)
    inbox = folders.ensure_inbox(archive, owner).public_id
    with pytest.raises(BadRequest):
        folders.set_collaborator(archive, owner, inbox, "vic", Role.VIEWER)
    with pytest.raises(NotFound):  # not a member: the folder does not exist for them
        folders.open_folder(archive, viewer, other)
    folders.delete_folder(archive, editor, other)
    assert not editor.may_read(first.StudyInstanceUID)
    assert admin.may_read(first.StudyInstanceUID)


def test_the_download_switch(server: RunningServer) -> None:
    ds, _ = _store(server)
    study = ds.StudyInstanceUID
    token, _viewer = _member(server, "dora")
    folder = grant(server.archive, "dora", study, download=False)
    bearer = {"Authorization": f"Bearer {token}"}
    base = f"{server.dicomweb}/studies/{study}"
    frame = f"{base}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}/frames/1"
    assert httpx.get(base + "/metadata", headers=bearer).status_code == 200
    assert httpx.get(frame, headers=bearer).status_code == 200
    assert httpx.get(base, headers=bearer).status_code == 403
    assert httpx.get(f"{server.url}/download/studies/{study}.zip",
                     headers=bearer).status_code == 403
    admin = sharing.acting_as(server.archive, None)
    folders.update_folder(server.archive, admin, folder, allow_download=True)
    answer = httpx.get(f"{server.url}/download/studies/{study}.zip", headers=bearer)
    assert answer.status_code == 200
    assert "DICOMDIR" in zipfile.ZipFile(io.BytesIO(answer.content)).namelist()


class _Inbox:
    """Messages an aiosmtpd server received."""

    def __init__(self) -> None:
        self.messages: list[email.message.Message] = []

    async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:
        self.messages.append(email.message_from_bytes(envelope.content))
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[_Inbox, int]]:
    inbox = _Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


def test_an_invitation_by_e_mail_makes_an_account_that_joins_the_folder(
    archive: Archive, smtp: tuple[_Inbox, int], tmp_path: Any
) -> None:
    from dataclasses import replace

    mailbox, port = smtp
    archive.settings = replace(archive.settings, smtp_host="127.0.0.1", smtp_port=port,
                               smtp_security="none", smtp_from="images@example.org")
    auth.add_organisation(archive, "St Elsewhere")
    auth.add_user(archive, "owen", PASSWORD, is_admin=False, organisation="St Elsewhere")
    owner = sharing.acting_as(archive, "owen")
    folder = folders.create_folder(archive, owner, "Referrals").public_id
    invited = invitations.invite(archive, owner, folder, "Newcomer@Example.org", Role.UPLOADER,
                                 site_url="https://images.example.org")
    assert invited.emailed and invited.url is not None
    assert invited.url.startswith("https://images.example.org/invite/lbi_")
    message = mailbox.messages[-1]
    assert message["To"] == "Newcomer@Example.org"
    assert invited.url in message.get_payload(decode=True).decode()
    token = invited.url.rsplit("/", 1)[1]
    with pytest.raises(BadRequest):  # the password rules apply
        invitations.accept_new_account(archive, token, "newcomer", "short")
    invitations.accept_new_account(archive, token, "newcomer", PASSWORD)
    joined = sharing.acting_as(archive, "newcomer")
    view = folders.open_folder(archive, joined, folder)
    assert view.role is Role.UPLOADER
    assert joined.organisation_id == owner.organisation_id != 1
    with pytest.raises(NotFound):  # used
        invitations.open_invitation(archive, token)
    # Someone with an account is added at once, by name or by address.
    assert invitations.invite(archive, owner, folder, "newcomer@example.org", Role.EDITOR,
                              site_url="x").member is not None
    assert folders.open_folder(archive, joined, folder).role is Role.EDITOR
    # An expired invitation is gone.
    late = invitations.invite(archive, owner, folder, "late@example.org", Role.VIEWER,
                              site_url="x")
    assert late.url is not None
    with archive.db.write() as conn:
        conn.execute(update(invitations_table)
                     .where(invitations_table.c.email == "late@example.org")
                     .values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    with pytest.raises(NotFound):
        invitations.open_invitation(archive, late.url.rsplit("/", 1)[1])
    with pytest.raises(BadRequest):
        invitations.invite(archive, owner, folder, "not an address@", Role.VIEWER, site_url="x")
    with pytest.raises(NotFound):
        invitations.open_invitation(archive, "lbi_guessed")


def test_folder_pages_invite_and_join(server: RunningServer) -> None:
    ds, _ = _store(server)
    auth.add_user(server.archive, "petra", PASSWORD, is_admin=False)
    grant(server.archive, "petra", ds.StudyInstanceUID, role="owner")
    with _session(server, "petra") as client:
        listing = client.get("/folders")
        assert listing.status_code == 200 and "Inbox" in listing.text
        made = client.post("/folders", data={"name": "Tumour board"})
        assert made.status_code == 303
        page_url = made.headers["location"]
        folder = page_url.rsplit("/", 1)[1]
        assert client.post("/folders", data={"name": "  "}).status_code == 400
        added = client.post(f"{page_url}/add", data={"study": ds.StudyInstanceUID})
        assert added.status_code == 200 and ds.StudyInstanceUID in added.text
        forged = client.post(f"{page_url}/comment", data={"text": "hi"},
                             headers={"Origin": "http://evil.example"})
        assert forged.status_code == 403
        commented = client.post(f"{page_url}/comment", data={"text": "Read by Friday"})
        assert commented.status_code == 200
        invited = client.post(f"{page_url}/members", data={"who": "quinn@example.org",
                                                           "role": "viewer"})
        assert invited.status_code == 200
        found = re.search(r"/invite/(lbi_[A-Za-z0-9_-]+)", invited.text)
        assert found is not None
        assert client.post(f"{page_url}/nonsense", data={}).status_code == 404
    with httpx.Client(base_url=server.url, headers={"Origin": server.url}) as guest:
        page = guest.get(f"/invite/{found.group(1)}")
        assert page.status_code == 200 and "Tumour board" in page.text
        differ = guest.post(f"/invite/{found.group(1)}", data={
            "username": "quinn", "password": PASSWORD, "password2": PASSWORD + "x"})
        assert differ.status_code == 400
        joined = guest.post(f"/invite/{found.group(1)}", data={
            "username": "quinn", "password": PASSWORD, "password2": PASSWORD})
        assert joined.status_code == 303 and joined.headers["location"] == "/folders"
        folder_page = guest.get(f"/folders/{folder}")
        assert folder_page.status_code == 200 and "Read by Friday" in folder_page.text
        assert ds.StudyInstanceUID in folder_page.text
        # A viewer sees no forms for what their role does not allow.
        assert 'action="/folders/' + folder + '/remove"' not in folder_page.text
        assert guest.get(f"/invite/{found.group(1)}").status_code == 404
        assert guest.post(f"/folders/{folder}/remove",
                          data={"study": ds.StudyInstanceUID}).status_code == 403


def test_a_collaborators_link_opens_for_collaborators_only(server: RunningServer) -> None:
    ds, _ = _store(server)
    study = ds.StudyInstanceUID
    _t, owner = _member(server, "fay")
    folder = grant(server.archive, "fay", study, role="owner")
    colleague_token, _c = _member(server, "gus")
    outsider_token, _o = _member(server, "hal")
    admin = sharing.acting_as(server.archive, None)
    folders.set_collaborator(server.archive, admin, folder, "gus", Role.VIEWER)
    with pytest.raises(BadRequest):  # a collaborators link names its folder
        sharing.create_share(server.archive, owner, study=study,
                             access=sharing.Access.COLLABORATORS)
    made = sharing.create_share(server.archive, owner, study=study,
                                access=sharing.Access.COLLABORATORS, folder=folder)
    root = f"{server.url}/s/{made.token}/dicom-web/studies"
    assert httpx.get(root).status_code == 401
    assert httpx.get(root, headers={"Authorization": f"Bearer {outsider_token}"}
                     ).status_code == 403
    answer = httpx.get(root, headers={"Authorization": f"Bearer {colleague_token}"})
    assert answer.status_code == 200 and len(answer.json()) == 1
    # A viewer of a folder that does not allow re-sharing cannot pass the study on.
    with pytest.raises(Forbidden):
        sharing.create_share(server.archive, sharing.acting_as(server.archive, "gus"),
                             study=study)


def test_grants_reach_other_processes_within_seconds(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The grant cache is per process; a change made elsewhere shows within CACHE_SECONDS."""
    from lightbox.services import access

    monkeypatch.setattr(access, "CACHE_SECONDS", 0.5)  # the rule, not the default's wait
    ds, _ = _store(server)
    _t, reader = _member(server, "ivy")
    assert not reader.may_read(ds.StudyInstanceUID)
    folder = grant(server.archive, "ivy", ds.StudyInstanceUID)
    assert reader.may_read(ds.StudyInstanceUID)  # this process: at once
    with server.archive.db.write() as conn:  # as another process would: cache untouched
        from lightbox.index.folders import delete_folder, folder_by_public_id

        row = folder_by_public_id(conn, folder)
        assert row is not None
        delete_folder(conn, row.id)
    assert reader.may_read(ds.StudyInstanceUID)
    time.sleep(access.CACHE_SECONDS + 0.2)
    assert not reader.may_read(ds.StudyInstanceUID)


def test_cli_organisations_users_and_folders(
    server: RunningServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ds, _ = _store(server)
    settings = server.archive.settings
    common = ["--data", str(settings.data), "--database", settings.database]
    assert cli(["org", "add", "General Hospital", *common]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert cli(["user", "add", "kim", "--org", "General Hospital", "--email", "kim@example.org",
                *common]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert cli(["user", "add", "lou", "--org", "Nowhere", *common]) == 2
    capsys.readouterr()
    assert cli(["org", "list", *common]) == 0
    assert "General Hospital\tkim" in capsys.readouterr().out
    assert cli(["folder", "create", "Cases", *common]) == 0
    folder = capsys.readouterr().out.strip()
    assert cli(["folder", "add", folder, ds.StudyInstanceUID, *common]) == 0
    assert cli(["folder", "invite", folder, "kim@example.org", "--role", "editor", *common]) == 0
    assert "kim is editor" in capsys.readouterr().out
    assert cli(["folder", "invite", folder, "new@example.org", *common]) == 0
    assert "/invite/lbi_" in capsys.readouterr().out
    assert cli(["folder", "list", "--user", "kim", *common]) == 0
    listed = capsys.readouterr().out
    assert "Cases" in listed and "editor" in listed and "1 studies" in listed
    assert cli(["folder", "add", folder, "1.2.3", "--user", "kim", *common]) == 2


def test_parallel_uploads_of_one_new_study_are_all_the_members(server: RunningServer) -> None:
    """The upload page sends several requests at once: each must find the new
    study theirs, whichever request stored it first."""
    from concurrent.futures import ThreadPoolExecutor

    token, member = _member(server, "nora")
    study = ct_dataset().StudyInstanceUID
    bodies = [stow_body([to_bytes(ct_dataset(study=study, instance_number=i))])
              for i in range(8)]

    def send(body: tuple[bytes, str]) -> int:
        return httpx.post(server.dicomweb + "/studies", content=body[0], headers={
            "Authorization": f"Bearer {token}", "Content-Type": body[1]}).status_code

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(send, bodies)) == [200] * 8
    assert _studies(server, token) == [study]
    instances = httpx.get(server.dicomweb + f"/studies/{study}/instances",
                          headers={"Authorization": f"Bearer {token}"}).json()
    assert len(instances) == 8
    # A refused upload leaves no claim behind: a study made later by someone
    # else with that UID is not the member's.
    refused = ct_dataset()
    broken = to_bytes(refused)[:200]
    body, kind = stow_body([broken])
    httpx.post(server.dicomweb + "/studies", content=body, headers={
        "Authorization": f"Bearer {token}", "Content-Type": kind})
    _ds, by_admin = _store(server, study=None)
    assert by_admin.status_code == 200
    assert not member.may_read(str(_ds.StudyInstanceUID))
