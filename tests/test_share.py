"""Share links on both backends: the scoped DICOMweb root, passcodes and their
lock-out, expiry, revocation, organisation links, the CLI and the audit trail."""

from __future__ import annotations

import dataclasses
import io
import zipfile
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid
from sqlalchemy import update

from lightbox.archive import Archive
from lightbox.cli.main import main as cli
from lightbox.errors import BadRequest, Forbidden, NotFound, Unauthenticated
from lightbox.index.shares import share_links
from lightbox.services import audit, auth, sharing
from lightbox.services.auth import Principal
from tests.conftest import RunningServer
from tests.factories import ROOT, ct_dataset, stow_body, to_bytes

ADMIN = Principal(user="admin", is_admin=True)
INSTANCE = "/studies/{0}/series/{1}/instances/{2}"


def store(server: RunningServer, parts: list[bytes]) -> None:
    body, content_type = stow_body(parts)
    answer = httpx.post(server.dicomweb + "/studies", content=body, timeout=60,
                        headers={**server.headers, "Content-Type": content_type})
    assert answer.status_code == 200, answer.text


def make_study(server: RunningServer, n_series: int = 2, per_series: int = 2,
               **extra: Any) -> tuple[str, list[tuple[str, str]]]:
    """A stored study: its UID and (series, sop) of each instance."""
    study = str(generate_uid(prefix=ROOT))
    parts, members = [], []
    for s in range(n_series):
        series = str(generate_uid(prefix=ROOT))
        for i in range(per_series):
            ds = ct_dataset(study=study, series=series, instance_number=i + 1,
                            SeriesNumber=s + 1, **extra)
            parts.append(to_bytes(ds))
            members.append((series, str(ds.SOPInstanceUID)))
    store(server, parts)
    return study, members


def share(server: RunningServer, study: str, **options: object) -> tuple[sharing.ShareLink, str]:
    made = sharing.create_share(server.archive, ADMIN, study=study, **options)  # type: ignore[arg-type]
    return made.link, f"{server.url}/s/{made.token}"


def test_scoped_root_serves_the_study_and_nothing_else(server: RunningServer) -> None:
    study, members = make_study(server)
    other, other_members = make_study(server, patient_id="OTHER-1", patient_name="Other^One")
    _link, url = share(server, study)
    root = url + "/dicom-web"
    series, sop = members[0]
    allowed = {
        "/studies": "application/dicom+json",
        f"/studies/{study}/series": "application/dicom+json",
        f"/studies/{study}/series/{series}/instances": "application/dicom+json",
        f"/studies/{study}/metadata": "application/dicom+json",
        INSTANCE.format(study, series, sop) + "/metadata": "application/dicom+json",
        INSTANCE.format(study, series, sop) + "/frames/1": "multipart/related",
        INSTANCE.format(study, series, sop): "multipart/related",
        INSTANCE.format(study, series, sop) + "/rendered": "image/jpeg",
        f"/studies/{study}/series/{series}/thumbnail": "image/jpeg",
        INSTANCE.format(study, series, sop) + "/bulkdata/7FE00010": "multipart/related",
    }
    for path, media in allowed.items():
        accept = {"Accept": "*/*"} if "frames" in path or path.endswith(sop) else {}
        answer = httpx.get(root + path, headers=accept)
        assert answer.status_code == 200, (path, answer.text)
        assert answer.headers["content-type"].startswith(media), path
    found = httpx.get(root + "/studies").json()
    assert [s["0020000D"]["Value"][0] for s in found] == [study]
    assert root + f"/studies/{study}" in httpx.get(root + "/studies").text  # Retrieve URL
    other_series, other_sop = other_members[0]
    for path in (f"/studies/{other}", f"/studies/{other}/metadata",
                 INSTANCE.format(other, other_series, other_sop) + "/frames/1",
                 f"/studies/{other}/series/{other_series}/thumbnail",
                 f"/studies/{other}/series", f"/studies/{study}/series/{other_series}/metadata"):
        answer = httpx.get(root + path, headers={"Accept": "*/*"})
        assert answer.status_code == 404, path
        assert "OTHER-1" not in answer.text and "Other" not in answer.text
        assert "0020000D" not in answer.text  # no DICOM JSON at all
    assert httpx.get(root + f"/studies?StudyInstanceUID={other}").json() == []
    body, content_type = stow_body([to_bytes(ct_dataset(study=study))])
    stow = httpx.post(root + "/studies", content=body, headers={"Content-Type": content_type})
    assert stow.status_code in (403, 405)
    assert httpx.delete(root + f"/studies/{study}").status_code in (403, 405)
    assert httpx.get(server.dicomweb + f"/studies/{study}/series",
                     headers=server.headers).json()  # nothing was deleted


def test_dicomweb_client_retrieves_the_shared_study(server: RunningServer) -> None:
    study, members = make_study(server, n_series=2, per_series=3)
    _link, url = share(server, study)
    client = DICOMwebClient(url=url + "/dicom-web")
    assert [s["0020000D"]["Value"][0] for s in client.search_for_studies()] == [study]
    instances = client.retrieve_study(study)
    assert sorted(str(ds.SOPInstanceUID) for ds in instances) == sorted(s for _, s in members)
    assert all(ds.PatientID == "PAT-1" for ds in instances)
    series, sop = members[0]
    frame = client.retrieve_instance_frames(study, series, sop, frame_numbers=[1])
    assert len(frame[0]) == 32 * 32 * 2


def test_expired_revoked_and_unknown_links_are_refused_alike(server: RunningServer) -> None:
    study, _members = make_study(server, n_series=1, per_series=1)
    expired, expired_url = share(server, study)
    with server.archive.db.write() as conn:
        conn.execute(update(share_links).where(share_links.c.public_id == expired.id)
                     .values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    revoked, revoked_url = share(server, study)
    sharing.revoke(server.archive, ADMIN, revoked.id)
    unknown_url = f"{server.url}/s/{'x' * 43}"
    pages = set()
    for url in (expired_url, revoked_url, unknown_url):
        for path in ("/dicom-web/studies", f"/dicom-web/studies/{study}/metadata"):
            answer = httpx.get(url + path)
            assert answer.status_code == 404, (url, path)
            assert "PAT-1" not in answer.text and study not in answer.text
        page = httpx.get(url)
        assert page.status_code == 404
        assert page.headers["referrer-policy"] == "no-referrer"
        pages.add(page.text)
    assert len(pages) == 1  # the same page whatever the reason


def test_passcode_unlocks_and_locks_out_after_five_failures(server: RunningServer) -> None:
    study, _members = make_study(server, n_series=1, per_series=1)
    link, url = share(server, study, passcode="tulip-42")
    assert httpx.get(url + "/dicom-web/studies").status_code == 401
    page = httpx.get(url)
    assert page.status_code == 200 and 'name="passcode"' in page.text and "PAT-1" not in page.text
    wrong = httpx.post(url + "/unlock", data={"passcode": "nope"})
    assert wrong.status_code == 401
    good = httpx.post(url + "/unlock", data={"passcode": "tulip-42"})
    assert good.status_code == 200
    token = good.json()["token"]
    bearer = {"Authorization": f"Bearer {token}"}
    assert httpx.get(url + "/dicom-web/studies", headers=bearer).status_code == 200
    for _ in range(sharing.MAX_FAILURES):
        assert httpx.post(url + "/unlock", data={"passcode": "guess"}).status_code == 401
    locked = httpx.post(url + "/unlock", data={"passcode": "tulip-42"})
    assert locked.status_code == 403  # even the right passcode, until the window passes
    assert "try again later" in locked.text
    # The count lives in the index: another process (here: the service) sees the lock.
    with pytest.raises(Forbidden):
        sharing.unlock(server.archive, link, "tulip-42")
    with server.archive.db.write() as conn:
        conn.execute(update(share_links).where(share_links.c.public_id == link.id).values(
            failure_window_start=datetime.now(UTC) - timedelta(minutes=16),
            locked_until=datetime.now(UTC) - timedelta(minutes=1)))
    assert httpx.post(url + "/unlock", data={"passcode": "tulip-42"}).status_code == 200


def test_passcode_form_sets_a_cookie_scoped_to_the_link(server: RunningServer) -> None:
    study, _members = make_study(server, n_series=1, per_series=1)
    _link, url = share(server, study, passcode="tulip-42")
    path = url.removeprefix(server.url)
    same_origin = {"Origin": server.url}
    assert httpx.post(url, data={"passcode": "tulip-42"}).status_code == 403  # no Origin
    wrong = httpx.post(url, data={"passcode": "wrong"}, headers=same_origin)
    assert wrong.status_code == 401 and "wrong passcode" in wrong.text
    with httpx.Client() as browser:
        answer = browser.post(url, data={"passcode": "tulip-42"}, headers=same_origin)
        assert answer.status_code == 303
        cookie = answer.headers["set-cookie"]
        assert f"Path={path}" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie
        page = browser.get(url)
        assert page.status_code == 200 and "Series" in page.text
        assert browser.get(url + "/dicom-web/studies").status_code == 200
    assert httpx.get(url + "/dicom-web/studies").status_code == 401


def test_organisation_link_refuses_anonymous_callers(server: RunningServer) -> None:
    study, _members = make_study(server, n_series=1, per_series=1)
    _link, url = share(server, study, access=sharing.Access.ORGANISATION)
    assert httpx.get(url + "/dicom-web/studies").status_code == 401
    page = httpx.get(url)
    assert page.status_code == 303 and page.headers["location"].startswith("/login")
    auth.add_user(server.archive, "viewer1", None, is_admin=False)
    token = auth.create_token(server.archive, user="viewer1")
    answer = httpx.get(url + "/dicom-web/studies", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200 and len(answer.json()) == 1


def test_download_follows_the_link(server: RunningServer) -> None:
    study, members = make_study(server, n_series=1, per_series=2)
    _link, url = share(server, study)
    answer = httpx.get(url + "/download.zip")
    assert answer.status_code == 200
    names = zipfile.ZipFile(io.BytesIO(answer.content)).namelist()
    assert "DICOMDIR" in names and len(names) == len(members) + 1
    _link, closed = share(server, study, allow_download=False)
    assert httpx.get(closed + "/download.zip").status_code == 403


def test_who_may_create_and_revoke(archive: Archive, server: RunningServer) -> None:
    study, _members = make_study(server, n_series=1, per_series=1)
    with pytest.raises(Forbidden):
        sharing.create_share(archive, Principal("ro", False, read_only=True), study=study)
    with pytest.raises(Forbidden):
        sharing.create_share(archive, Principal("sc", False, frozenset({study})), study=study)
    with pytest.raises(NotFound):
        sharing.create_share(archive, ADMIN, study=generate_uid(prefix=ROOT))
    with pytest.raises(BadRequest):
        sharing.create_share(archive, ADMIN, study=study, expires=timedelta(days=400))
    made = sharing.create_share(archive, Principal("alice", False), study=study)
    assert made.link.expires_at - made.link.created_at == sharing.DEFAULT_LIFETIME
    assert len(made.token) >= 43 and made.token not in str(sharing.list_shares(archive, ADMIN))
    with pytest.raises(NotFound):
        sharing.revoke(archive, Principal("bob", False), made.link.id)
    assert [s.id for s in sharing.list_shares(archive, Principal("alice", False))] == [
        made.link.id]
    assert sharing.revoke(archive, ADMIN, made.link.id).state() == "revoked"
    with pytest.raises(NotFound):
        sharing.resolve(archive, made.token)
    signed_in = dataclasses.replace(made.link, access=sharing.Access.ORGANISATION)
    with pytest.raises(Unauthenticated):
        sharing.holder(archive, signed_in, None)
    with pytest.raises(Forbidden):
        sharing.holder(archive, signed_in, Principal("dave", False, user_id=7, organisation_id=2))
    holder = sharing.holder(archive, signed_in,
                            Principal("carol", False, user_id=8, organisation_id=1))
    assert holder.studies == frozenset({study}) and holder.read_only and not holder.is_admin


def test_cli_creates_lists_and_revokes(
    server: RunningServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    study, _members = make_study(server, n_series=1, per_series=1)
    settings = server.archive.settings
    common = ["--data", str(settings.data), "--database", settings.database]
    monkeypatch.setattr("sys.stdin", io.StringIO("lily-pad-7\n"))
    assert cli(["share", "create", study, "--expires", "7d", "--passcode", "--no-download",
                *common]) == 0
    url = capsys.readouterr().out.strip()
    assert url.startswith("http://127.0.0.1:8042/s/")
    token = url.rsplit("/", 1)[1]
    link = sharing.resolve(server.archive, token)
    assert link.has_passcode and not link.allow_download
    assert timedelta(days=6, hours=23) < link.expires_at - link.created_at <= timedelta(days=7)
    assert cli(["share", "list", study, *common]) == 0
    assert link.id in capsys.readouterr().out
    assert cli(["share", "revoke", link.id, *common]) == 0
    with pytest.raises(NotFound):
        sharing.resolve(server.archive, token)


def test_share_events_land_in_the_audit_trail(server: RunningServer) -> None:
    study, members = make_study(server, n_series=1, per_series=1)
    made = sharing.create_share(server.archive, ADMIN, study=study, passcode="tulip-42")
    url = f"{server.url}/s/{made.token}"
    httpx.post(url + "/unlock", data={"passcode": "wrong"})
    token = httpx.post(url + "/unlock", data={"passcode": "tulip-42"}).json()["token"]
    bearer = {"Authorization": f"Bearer {token}"}
    series, _sop = members[0]
    assert httpx.get(url + f"/dicom-web/studies/{study}/series/{series}/metadata",
                     headers=bearer).is_success
    httpx.get(url + "/dicom-web/studies")  # refused: no unlock token
    server.archive.audit.flush()
    rows = audit.history_of_link(server.archive.db, made.link.id)
    seen = {(r["action"], r["outcome"]) for r in rows}
    assert {("share_unlock", "failure"), ("share_unlock", "success"), ("view", "success"),
            ("access_denied", "failure")} <= seen
    assert all(r["study_uid"] == study for r in rows)
    assert made.token not in str(rows)


def test_the_links_viewer_page_follows_the_link(server: RunningServer) -> None:
    """OHIF's page under /s/<token>/view: behind the passcode, configured for the
    link's scoped root only, gone with the link."""
    study, _members = make_study(server, n_series=1, per_series=1)
    link, url = share(server, study, passcode="tulip-42")
    same_origin = {"Origin": server.url}
    with httpx.Client() as browser:
        opened = browser.get(url + "/view")
        assert opened.status_code == 303 and "/view/viewer?StudyInstanceUIDs=" in opened.headers[
            "location"]
        locked = browser.get(url + "/view/viewer")
        assert locked.status_code == 303 and locked.headers["location"].endswith(
            url.rsplit("/", 1)[1])
        assert browser.post(url, data={"passcode": "tulip-42"},
                            headers=same_origin).status_code == 303
        page = browser.get(url + "/view/viewer", params={"StudyInstanceUIDs": study})
        if page.status_code == 503:
            pytest.fail("the viewer is not installed: run `make install` first")
        assert page.status_code == 200
        token = url.rsplit("/", 1)[1]
        assert f'src="/s/{token}/app-config.js"' in page.text
        assert page.headers["referrer-policy"] == "no-referrer"
    config = httpx.get(f"{url}/app-config.js").text
    assert f"'/s/{token}'" in config and "showStudyList: false" in config
    assert "dicomlocal" not in config and "supportsStow: false" in config
    sharing.revoke(server.archive, ADMIN, link.id)
    assert httpx.get(url + "/view/viewer").status_code == 404
    assert httpx.get(url + "/app-config.js").status_code == 404
    _org_link, org_url = share(server, study, access=sharing.Access.ORGANISATION)
    answer = httpx.get(org_url + "/view/viewer")
    assert answer.status_code == 303 and answer.headers["location"].startswith("/login")
