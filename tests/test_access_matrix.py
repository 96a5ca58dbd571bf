"""The access-control matrix: every caller against every endpoint family and
study, on both backends, in one small world (tests/access_world.py).

An allowed call answers with the data; a forbidden one answers 401 (no or a
bad credential), 403 (a study the caller sees but may not download or change)
or 404 (a study the caller may not see: they must not learn that it exists),
and never with any of the study's data. Searches leave hidden studies out.
Then the writes (STOW-RS, key images, DELETE), the share links (guessed
UIDs, expiry, revocation, passcodes, organisation and collaborators links)
and DIMSE (C-FIND, C-MOVE, C-GET and C-STORE by nodes acting as users).
"""

from __future__ import annotations

import dataclasses
import io
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.events import Event
from sqlalchemy import func, select, update

from lightbox.dimse import contexts
from lightbox.dimse.status import Retrieve
from lightbox.errors import Forbidden, NotFound
from lightbox.index.schema import instances, series, studies
from lightbox.index.shares import share_links
from lightbox.services import folders, nodes, sharing
from lightbox.services.ingest import FailureReason
from tests.access_world import Study, World, build, stow, study_parts
from tests.conftest import BACKENDS, free_port
from tests.dimse_peers import scp
from tests.factories import ct_dataset, stow_body

ALL = frozenset({"S1", "S2", "S3", "S4", "S5"})
F1 = frozenset({"S1", "S4"})
# What each caller may see, and download as whole files.
READ: dict[str, frozenset[str]] = {
    "admin": ALL, "alice": F1, "bob": F1, "carol": F1, "dave": F1,
    "erin": frozenset({"S2"}), "mallory": frozenset(), "launch": frozenset({"S1"}),
}
DOWNLOAD: dict[str, frozenset[str]] = {
    "admin": ALL, "alice": F1,  # F1 has downloads off, but alice owns it
    "erin": frozenset({"S2"}),  # her inbox allows downloads
    "launch": frozenset({"S1"}),
}
UNAUTHENTICATED = ("anon", "forged")
CALLERS = (*READ, *UNAUTHENTICATED)
RESOURCES = ("S1", "S2", "S3")
ANY_SYNTAX = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@pytest.fixture(scope="module", params=BACKENDS)
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[World]:
    with build(str(request.param), tmp_path_factory.mktemp("world") / "data") as made:
        yield made


# -- the endpoint families -------------------------------------------------------------

Call = Callable[[World, Study, dict[str, str]], httpx.Response]


def _instance(s: Study) -> str:
    return f"/studies/{s.uid}/series/{s.series}/instances/{s.sop}"


def _get(path: str, accept: str | None = None) -> Call:
    def call(w: World, s: Study, headers: dict[str, str]) -> httpx.Response:
        url = w.url + path.format(uid=s.uid, series=s.series, sop=s.sop, pid=s.patient_id,
                                  instance=_instance(s))
        return w.client.get(url, headers={**headers, **({"Accept": accept} if accept else {})})
    return call


def _launch(w: World, s: Study, headers: dict[str, str]) -> httpx.Response:
    return w.client.post(f"{w.url}/launch/slicer/{s.uid}", headers=headers)


@dataclass(frozen=True)
class Family:
    """How to call one endpoint family, and which rule decides the answer:
    ``read`` (200 or 404), ``download`` (200, 403 when seen but not
    downloadable, or 404), ``search`` (200 with or without the study),
    ``listing`` (a page listing the study or not), ``launch`` (303, 403, 404)."""

    rule: str
    call: Call


WADO_URI = "/wado?requestType=WADO&studyUID={uid}&seriesUID={series}&objectUID={sop}"
FAMILIES: dict[str, Family] = {
    "qido-studies": Family("search", _get("/dicom-web/studies?limit=1000")),
    "qido-study-uid": Family("search", _get("/dicom-web/studies?StudyInstanceUID={uid}")),
    "qido-patient-id": Family("search", _get("/dicom-web/studies?PatientID={pid}")),
    "qido-study-series": Family("search", _get("/dicom-web/studies/{uid}/series")),
    "qido-series": Family("search", _get("/dicom-web/series?StudyInstanceUID={uid}")),
    "qido-instances": Family("search", _get(
        "/dicom-web/instances?StudyInstanceUID={uid}&includefield=all")),
    "wado-metadata": Family("read", _get("/dicom-web/studies/{uid}/metadata")),
    "wado-instance-metadata": Family("read", _get("/dicom-web{instance}/metadata")),
    "wado-frames": Family("read", _get("/dicom-web{instance}/frames/1", "*/*")),
    "wado-bulkdata": Family("read", _get("/dicom-web{instance}/bulkdata/7FE00010")),
    "wado-rendered": Family("read", _get("/dicom-web/studies/{uid}/rendered")),
    "wado-thumbnail": Family("read", _get("/dicom-web/studies/{uid}/series/{series}/thumbnail")),
    "browse-thumbnail": Family("read", _get("/browse/thumbnails/{uid}/{series}.jpg")),
    "wado-uri-jpeg": Family("read", _get(WADO_URI)),
    "wado-retrieve-study": Family("download", _get("/dicom-web/studies/{uid}", ANY_SYNTAX)),
    "wado-retrieve-instance": Family("download", _get("/dicom-web{instance}", ANY_SYNTAX)),
    "wado-uri-dicom": Family("download", _get(WADO_URI + "&contentType=application/dicom")),
    "zip": Family("download", _get("/download/studies/{uid}.zip")),
    "study-page": Family("read", _get("/browse/studies/{uid}")),
    "browse-list": Family("listing", _get("/browse?size=100")),
    "launch": Family("launch", _launch),
}

def _expected(rule: str, caller: str, resource: str) -> int:
    seen = resource in READ[caller]
    if rule == "download":
        return 200 if resource in DOWNLOAD.get(caller, ()) else 403 if seen else 404
    if rule == "launch":
        if caller == "launch" and seen:
            return 403  # a token that may only read cannot hand out new ones
        return 303 if resource in DOWNLOAD.get(caller, ()) else 403 if seen else 404
    return 200 if seen or rule in ("search", "listing") else 404


def _cases() -> Iterator[Any]:
    for family in FAMILIES:
        for caller in CALLERS:
            for resource in RESOURCES:
                yield pytest.param(family, caller, resource,
                                   id=f"{family}-{caller}-{resource}")


def _assert_no_data(answer: httpx.Response, study: Study) -> None:
    text = answer.content.decode("latin-1")
    for tell in study.tells:
        assert tell not in text, f"{tell!r} leaked"
    assert b"DICM" not in answer.content and not answer.content.startswith(b"PK")
    assert "image/" not in answer.headers.get("content-type", "")


def _assert_data(family: str, answer: httpx.Response, study: Study) -> None:
    media = answer.headers.get("content-type", "")
    if family.startswith(("qido", "wado-metadata", "wado-instance-metadata")):
        assert study.uid in answer.text
    if family in ("wado-metadata", "wado-instance-metadata"):
        assert study.patient_id in answer.text
    elif family in ("wado-rendered", "wado-thumbnail", "browse-thumbnail", "wado-uri-jpeg"):
        assert media.startswith("image/") and len(answer.content) > 100
    elif family in ("wado-frames", "wado-bulkdata"):
        assert media.startswith("multipart/related") and len(answer.content) >= 32 * 32 * 2
    elif family in ("wado-retrieve-study", "wado-retrieve-instance", "wado-uri-dicom"):
        assert answer.content.count(b"DICM") >= 1 and study.sop.encode() in answer.content
    elif family == "zip":
        names = zipfile.ZipFile(io.BytesIO(answer.content)).namelist()
        assert "DICOMDIR" in names and len(names) == len(study.sops) + 1
    elif family == "study-page":
        assert study.patient_name.split("^")[0] in answer.text


@pytest.mark.parametrize(("family", "caller", "resource"), list(_cases()))
def test_matrix(world: World, family: str, caller: str, resource: str) -> None:
    study = world.studies[resource]
    answer = FAMILIES[family].call(world, study, world.headers(caller))
    if caller in UNAUTHENTICATED:
        # APIs say 401; pages send a browser to the login page.
        assert answer.status_code in (401, 303), answer.text[:300]
        if answer.status_code == 303:
            assert answer.headers["location"].startswith("/login")
        _assert_no_data(answer, study)
        return
    rule = FAMILIES[family].rule
    expected = _expected(rule, caller, resource)
    assert answer.status_code == expected, answer.text[:300]
    seen = resource in READ[caller]
    if rule == "search":
        found = answer.json()
        assert isinstance(found, list)
        assert (study.uid in answer.text) == seen
        if not seen:
            _assert_no_data(answer, study)
        else:
            assert found
    elif rule == "listing":
        assert (study.patient_name.split("^")[0] in answer.text) == seen
    elif rule == "launch":
        if expected == 303:
            assert answer.headers["location"].startswith("slicer://")
        else:
            _assert_no_data(answer, study)
    elif expected == 200:
        _assert_data(family, answer, study)
    else:
        _assert_no_data(answer, study)


# -- writes ------------------------------------------------------------------------------


def _count(world: World, study: Study) -> int:
    with world.archive.db.read() as conn:
        return int(conn.execute(
            select(func.count()).select_from(instances)
            .join(series, series.c.pk == instances.c.series_pk)
            .join(studies, studies.c.pk == series.c.study_pk)
            .where(studies.c.study_instance_uid == study.uid)).scalar_one())


def _stored(world: World, sop: str) -> bool:
    with world.archive.db.read() as conn:
        return conn.execute(select(instances.c.pk).where(
            instances.c.sop_instance_uid == sop)).first() is not None


def _sees(world: World, caller: str, study: str) -> bool:
    answer = world.client.get(f"{world.url}/dicom-web/studies?StudyInstanceUID={study}",
                              headers=world.headers(caller))
    assert answer.status_code == 200
    return study in answer.text


@pytest.mark.parametrize(("caller", "target"), [
    ("bob", "S1"), ("bob", "S4"),  # a viewer changes nothing
    ("erin", "S1"), ("erin", "S3"), ("mallory", "S3"),  # studies they cannot see
])
def test_stow_into_a_study_the_caller_may_not_add_to_is_refused(
    world: World, caller: str, target: str
) -> None:
    study = world.studies[target]
    before = _count(world, study)
    added, parts = study_parts("Intruder^Ian", "INTRUDER", instances=1, study=study.uid,
                               series=study.series)
    answer = stow(world.client, world.url, world.tokens[caller], parts)
    assert answer.status_code == 409, answer.text
    failed = answer.json()["00081198"]["Value"]
    assert [f["00081197"]["Value"][0] for f in failed] == [FailureReason.NOT_AUTHORIZED]
    assert FailureReason.NOT_AUTHORIZED == 0x0124
    assert "00081199" not in answer.json()
    _assert_no_data(answer, study)
    assert _count(world, study) == before and not _stored(world, added.sop)
    assert _sees(world, caller, study.uid) == (target in READ[caller])  # nothing filed


def test_stow_of_an_existing_instance_of_a_hidden_study_is_not_a_duplicate(world: World) -> None:
    """"Already stored" would tell a member that a study they cannot see exists."""
    hidden = world.studies["S3"]
    with world.archive.blobs.open(_first_blob(world, hidden.sop)) as fh:
        original = fh.read()
    answer = stow(world.client, world.url, world.tokens["mallory"], [original])
    assert answer.status_code == 409, answer.text
    assert "already stored" not in answer.headers.get("warning", "")
    assert not _sees(world, "mallory", hidden.uid)


def _first_blob(world: World, sop: str) -> str:
    with world.archive.db.read() as conn:
        return str(conn.execute(select(instances.c.blob_key).where(
            instances.c.sop_instance_uid == sop)).scalar_one())


@pytest.mark.parametrize(("caller", "status"), [("launch", 403), ("anon", 401), ("forged", 401)])
def test_stow_without_write_rights_is_refused_whole(world: World, caller: str, status: int) -> None:
    study = world.studies["S1"]
    before = _count(world, study)
    added, parts = study_parts("Intruder^Ian", "INTRUDER", instances=1, study=study.uid)
    answer = stow(world.client, world.url, world.tokens.get(caller), parts)
    assert answer.status_code == status
    assert _count(world, study) == before and not _stored(world, added.sop)


@pytest.mark.parametrize("caller", ["admin", "alice", "carol", "dave"])
def test_stow_into_a_folder_study_by_an_uploader_or_above_is_stored(
    world: World, caller: str
) -> None:
    study = world.studies["S4"]
    before = _count(world, study)
    added, parts = study_parts("Kepler^Four", "PAT-S4", instances=1, study=study.uid,
                               series=study.series)
    answer = stow(world.client, world.url, world.tokens[caller], parts)
    assert answer.status_code == 200, answer.text
    assert _count(world, study) == before + 1 and _stored(world, added.sop)
    seen = world.client.get(f"{world.url}/dicom-web/studies/{study.uid}/series/{study.series}"
                            f"/instances/{added.sop}/metadata", headers=world.headers("bob"))
    assert seen.status_code == 200  # in F1 for every collaborator


def test_a_members_new_study_lands_in_their_inbox_only(world: World) -> None:
    new, parts = study_parts("Newton^Nine", "PAT-NEW")
    answer = stow(world.client, world.url, world.tokens["mallory"], parts)
    assert answer.status_code == 200, answer.text
    assert _sees(world, "mallory", new.uid) and _sees(world, "admin", new.uid)
    for other in ("bob", "erin", "alice"):
        assert not _sees(world, other, new.uid)
    inbox = folders.ensure_inbox(world.archive, world.principal("mallory"))
    assert [g.folder_public_id for g in folders.folders_of_study(
        world.archive, world.principal("mallory"), new.uid)] == [inbox.public_id]


def _mark(world: World, caller: str, study: Study) -> httpx.Response:
    form = {"study": study.uid, "series": study.series, "sop": study.sop, "frame": ""}
    return world.client.post(world.url + "/key-images", data=form, headers=world.headers(caller))


@pytest.mark.parametrize(("caller", "target", "status"), [
    ("bob", "S1", 403), ("launch", "S1", 403),  # sees it, may not add to it
    ("erin", "S1", 404), ("mallory", "S3", 404), ("carol", "S3", 404),  # cannot see it
    ("anon", "S1", 401), ("forged", "S1", 401),
    ("carol", "S4", 303), ("dave", "S4", 303), ("alice", "S4", 303),
])
def test_key_images_need_the_uploader_role(
    world: World, caller: str, target: str, status: int
) -> None:
    study = world.studies[target]
    before = _count(world, study)
    answer = _mark(world, caller, study)
    assert answer.status_code == status, answer.text[:300]
    assert _count(world, study) == before + (1 if status == 303 else 0)
    if status != 303:
        _assert_no_data(answer, study)


@pytest.mark.parametrize("caller", ["alice", "bob", "carol", "dave", "erin", "mallory", "launch"])
@pytest.mark.parametrize("target", ["S1", "S2", "S3"])
def test_members_may_not_delete(world: World, caller: str, target: str) -> None:
    study = world.studies[target]
    before = _count(world, study)
    answer = world.client.delete(f"{world.url}/dicom-web/studies/{study.uid}",
                                 headers=world.headers(caller))
    assert answer.status_code == 403, answer.text
    page = world.client.post(f"{world.url}/browse/studies/{study.uid}/delete",
                             data={"confirm": "yes"}, headers=world.headers(caller))
    assert page.status_code in (403, 404), page.text[:300]
    instance = world.client.delete(f"{world.url}/dicom-web{_instance(study)}",
                                   headers=world.headers(caller))
    assert instance.status_code == 403
    for refused in (answer, page, instance):
        _assert_no_data(refused, study)
    assert _count(world, study) == before


def test_delete_without_credentials_is_401(world: World) -> None:
    study = world.studies["S1"]
    before = _count(world, study)
    for caller in UNAUTHENTICATED:
        answer = world.client.delete(f"{world.url}/dicom-web/studies/{study.uid}",
                                     headers=world.headers(caller))
        assert answer.status_code == 401
    assert _count(world, study) == before


def test_the_administrator_deletes(world: World) -> None:
    study = world.studies["S5"]
    answer = world.client.delete(f"{world.url}/dicom-web/studies/{study.uid}",
                                 headers=world.headers("admin"))
    assert answer.status_code == 204
    assert _count(world, study) == 0
    gone = world.client.get(f"{world.url}/dicom-web/studies/{study.uid}/metadata",
                            headers=world.headers("admin"))
    assert gone.status_code == 404


def test_members_cannot_reach_a_hidden_instance_through_a_study_they_see(world: World) -> None:
    """S3's series and instance UIDs under S1's path, and as search keys."""
    s1, s3 = world.studies["S1"], world.studies["S3"]
    mixed = f"/studies/{s1.uid}/series/{s3.series}"
    paths = [
        mixed + f"/instances/{s3.sop}/frames/1", mixed + f"/instances/{s3.sop}/metadata",
        mixed + f"/instances/{s3.sop}/bulkdata/7FE00010", mixed + f"/instances/{s3.sop}",
        mixed + f"/instances/{s3.sop}/rendered", mixed + "/thumbnail", mixed + "/metadata",
    ]
    for caller in ("bob", "alice", "launch"):
        headers = {**world.headers(caller), "Accept": "*/*"}
        for path in paths:
            answer = world.client.get(world.url + "/dicom-web" + path, headers=headers)
            # Whole files of S1 are for those who may download it: bob learns that first.
            whole_file = path.endswith(s3.sop) and caller == "bob"
            assert answer.status_code == (403 if whole_file else 404), (caller, path)
            _assert_no_data(answer, s3)
        for path in (f"/browse/thumbnails/{s1.uid}/{s3.series}.jpg",
                     f"/wado?requestType=WADO&studyUID={s1.uid}&seriesUID={s3.series}"
                     f"&objectUID={s3.sop}"):
            answer = world.client.get(world.url + path, headers=headers)
            assert answer.status_code == 404, (caller, path)
            _assert_no_data(answer, s3)
        for query in (f"/series?SeriesInstanceUID={s3.series}",
                      f"/instances?SOPInstanceUID={s3.sop}",
                      f"/studies/{s1.uid}/series?SeriesInstanceUID={s3.series}",
                      f"/studies/{s1.uid}/instances?SOPInstanceUID={s3.sop}",
                      "/studies?PatientID=PAT-S3", "/studies?PatientName=Jansky*"):
            answer = world.client.get(world.url + "/dicom-web" + query, headers=headers)
            assert answer.status_code == 200 and answer.json() == [], (caller, query)


# -- share links -------------------------------------------------------------------------


def _share(world: World, creator: str = "alice", study: str = "S1",
           **options: Any) -> tuple[sharing.ShareLink, str]:
    made = sharing.create_share(world.archive, world.principal(creator),
                                study=world.studies[study].uid, **options)
    return made.link, f"{world.url}/s/{made.token}"


def test_a_share_root_serves_its_study_and_nothing_else(world: World) -> None:
    s1 = world.studies["S1"]
    _link, url = _share(world)
    root = url + "/dicom-web"
    found = world.client.get(root + "/studies")
    assert found.status_code == 200 and s1.uid in found.text and s1.patient_id in found.text
    frame = world.client.get(root + f"{_instance(s1)}/frames/1", headers={"Accept": "*/*"})
    assert frame.status_code == 200
    for key in ("S2", "S3", "S4"):
        other = world.studies[key]
        for path in (f"/studies/{other.uid}", f"/studies/{other.uid}/metadata",
                     f"/studies/{other.uid}/series", f"/studies/{other.uid}/rendered",
                     f"{_instance(other)}/frames/1", f"{_instance(other)}/metadata",
                     f"/studies/{other.uid}/series/{other.series}/thumbnail",
                     # the link's study in the path, another study's series and instance
                     f"/studies/{s1.uid}/series/{other.series}/metadata",
                     f"/studies/{s1.uid}/series/{other.series}/instances/{other.sop}/frames/1",
                     f"/studies/{s1.uid}/series/{other.series}/instances/{other.sop}"):
            answer = world.client.get(root + path, headers={"Accept": "*/*"})
            assert answer.status_code == 404, (key, path, answer.status_code)
            _assert_no_data(answer, other)
        for query in (f"/studies?StudyInstanceUID={other.uid}",
                      f"/studies?PatientID={other.patient_id}",
                      f"/series?StudyInstanceUID={other.uid}",
                      f"/series?SeriesInstanceUID={other.series}",
                      f"/instances?SOPInstanceUID={other.sop}"):
            answer = world.client.get(root + query)
            assert answer.status_code == 200 and answer.json() == [], (key, query)
    body, content_type = _stow_body_for(s1)
    stow_answer = world.client.post(root + "/studies", content=body,
                                    headers={"Content-Type": content_type})
    assert stow_answer.status_code in (403, 405)
    assert world.client.delete(root + f"/studies/{s1.uid}").status_code in (403, 405)
    assert _count(world, s1) == len(s1.sops)


def _stow_body_for(study: Study) -> tuple[bytes, str]:
    _added, parts = study_parts("Intruder^Ian", "INTRUDER", instances=1, study=study.uid)
    return stow_body(parts)


def test_share_credentials_open_nothing_outside_their_link(world: World) -> None:
    """Neither the link's token nor its unlock token is a DICOMweb token."""
    s1 = world.studies["S1"]
    link, url = _share(world, passcode="tulip-42")
    _other, other_url = _share(world, passcode="tulip-42")
    unlock = world.client.post(url + "/unlock", data={"passcode": "tulip-42"})
    assert unlock.status_code == 200
    bearer = {"Authorization": f"Bearer {unlock.json()['token']}"}
    assert world.client.get(url + "/dicom-web/studies", headers=bearer).status_code == 200
    assert world.client.get(other_url + "/dicom-web/studies", headers=bearer).status_code == 401
    link_token = url.rsplit("/", 1)[1]
    for headers in (bearer, {"Authorization": f"Bearer {link_token}"}):
        for path in ("/dicom-web/studies", f"/dicom-web/studies/{s1.uid}/metadata",
                     f"/download/studies/{s1.uid}.zip", f"/browse/studies/{s1.uid}"):
            answer = world.client.get(world.url + path, headers=headers)
            assert answer.status_code in (401, 303), (path, answer.status_code)
            _assert_no_data(answer, s1)
    assert link.has_passcode


def test_expired_and_revoked_links_are_gone(world: World) -> None:
    s1 = world.studies["S1"]
    expired, expired_url = _share(world)
    with world.archive.db.write() as conn:
        conn.execute(update(share_links).where(share_links.c.public_id == expired.id)
                     .values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    revoked, revoked_url = _share(world)
    sharing.revoke(world.archive, world.principal("alice"), revoked.id)
    passcoded, passcoded_url = _share(world, passcode="tulip-42")
    unlock = world.client.post(passcoded_url + "/unlock", data={"passcode": "tulip-42"})
    bearer = {"Authorization": f"Bearer {unlock.json()['token']}"}
    sharing.revoke(world.archive, world.principal("admin"), passcoded.id)
    for url, headers in ((expired_url, {}), (revoked_url, {}), (passcoded_url, bearer)):
        for path in ("", "/download.zip", "/dicom-web/studies",
                     f"/dicom-web/studies/{s1.uid}/metadata",
                     f"/dicom-web{_instance(s1)}/frames/1"):
            answer = world.client.get(url + path, headers={**headers, "Accept": "*/*"})
            assert answer.status_code == 404, (url, path)
            _assert_no_data(answer, s1)
        assert world.client.post(url + "/unlock", data={"passcode": "tulip-42"}).status_code == 404


def test_wrong_passcodes_are_refused_then_lock_the_link(world: World) -> None:
    s1 = world.studies["S1"]
    link, url = _share(world, passcode="tulip-42")
    for path in ("/dicom-web/studies", f"/dicom-web/studies/{s1.uid}/metadata", "/download.zip"):
        answer = world.client.get(url + path)
        assert answer.status_code == 401, path
        _assert_no_data(answer, s1)
    page = world.client.get(url)
    assert page.status_code == 200 and 'name="passcode"' in page.text
    _assert_no_data(page, s1)
    for _ in range(sharing.MAX_FAILURES):
        wrong = world.client.post(url + "/unlock", data={"passcode": "tulip-43"})
        assert wrong.status_code == 401
        assert "token" not in wrong.text
    locked = world.client.post(url + "/unlock", data={"passcode": "tulip-42"})
    assert locked.status_code == 403 and "token" not in locked.text
    with pytest.raises(Forbidden):
        sharing.unlock(world.archive, link, "tulip-42")


@pytest.mark.parametrize(("caller", "status"), [
    ("bob", 200), ("mallory", 200), ("admin", 200),  # organisation A, folders or not
    ("erin", 403),  # organisation B
    ("anon", 401), ("forged", 401),
])
def test_an_organisation_link_opens_for_its_organisation_only(
    world: World, caller: str, status: int
) -> None:
    s1 = world.studies["S1"]
    _link, url = _share(world, access=sharing.Access.ORGANISATION)
    answer = world.client.get(url + f"/dicom-web/studies/{s1.uid}/metadata",
                              headers=world.headers(caller))
    assert answer.status_code == status
    page = world.client.get(url, headers=world.headers(caller))
    if status == 200:
        assert s1.patient_id in answer.text
        assert page.status_code == 200
    else:
        _assert_no_data(answer, s1)
        _assert_no_data(page, s1)
        assert page.status_code == (303 if status == 401 else status)


@pytest.mark.parametrize(("caller", "status"), [
    ("alice", 200), ("bob", 200), ("carol", 200), ("dave", 200),  # F1's collaborators
    ("mallory", 403), ("erin", 403),
    ("anon", 401), ("forged", 401),
])
def test_a_collaborators_link_opens_for_the_folders_collaborators_only(
    world: World, caller: str, status: int
) -> None:
    s1 = world.studies["S1"]
    _link, url = _share(world, access=sharing.Access.COLLABORATORS, folder=world.folder)
    answer = world.client.get(url + "/dicom-web/studies", headers=world.headers(caller))
    assert answer.status_code == status
    if status == 200:
        assert [s["0020000D"]["Value"][0] for s in answer.json()] == [s1.uid]
    else:
        _assert_no_data(answer, s1)
        assert world.client.get(url + "/download.zip",
                                headers=world.headers(caller)).status_code in (status, 303)


def test_who_may_make_links(world: World) -> None:
    archive = world.archive
    s1, s2, s3 = (world.studies[k].uid for k in ("S1", "S2", "S3"))
    refused = [
        ("bob", s1, {}, Forbidden),  # a viewer of a folder without re-sharing
        ("carol", s1, {}, Forbidden),
        ("erin", s1, {}, NotFound),  # cannot see it: must not learn it exists
        ("mallory", s3, {}, NotFound),
        ("bob", s2, {}, NotFound),
        ("erin", s2, {"access": sharing.Access.COLLABORATORS, "folder": world.folder}, NotFound),
    ]
    for user, study, options, error in refused:
        with pytest.raises(error):
            sharing.create_share(archive, world.principal(user), study=study, **options)
    # Tokens limited to S1 (the launch token, read-only; and a writable one).
    scoped = world.principal("alice")
    for principal in (dataclasses.replace(scoped, studies=frozenset({s1}), read_only=True),
                      dataclasses.replace(scoped, studies=frozenset({s1}))):
        with pytest.raises(Forbidden):
            sharing.create_share(archive, principal, study=s1)
    assert sharing.create_share(archive, world.principal("erin"), study=s2).token
    link, _url = _share(world)
    for user in ("bob", "erin"):
        with pytest.raises(NotFound):
            sharing.revoke(archive, world.principal(user), link.id)
    # The same answers through the share form.
    for caller, status in (("bob", 403), ("erin", 404), ("launch", 403)):
        answer = world.client.post(world.url + "/shares", data={"study": s1},
                                   headers={**world.headers(caller), "Origin": world.url})
        assert answer.status_code == status, (caller, answer.status_code)


def test_a_deidentified_link_does_not_answer_to_the_original_uids(world: World) -> None:
    s1 = world.studies["S1"]
    _link, url = _share(world, deidentify=True)
    root = url + "/dicom-web"
    public = world.client.get(root + "/studies").json()[0]["0020000D"]["Value"][0]
    assert public != s1.uid
    for path in (f"/studies/{s1.uid}/metadata", f"{_instance(s1)}/frames/1",
                 f"/studies/{public}/series/{s1.series}/metadata"):
        answer = world.client.get(root + path, headers={"Accept": "*/*"})
        assert answer.status_code == 404, path
        _assert_no_data(answer, s1)


# -- DIMSE -------------------------------------------------------------------------------


@dataclass
class Dimse:
    """Our SCP over the world, and a storage SCP registered as move destination."""

    port: int
    received: list[str]


@pytest.fixture(scope="module")
def dimse(world: World) -> Iterator[Dimse]:
    received: list[str] = []

    def on_store(event: Event) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    destination = AE(ae_title="STORESCP")
    destination.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    destination.add_supported_context(contexts.VERIFICATION)
    port = free_port()
    running = destination.start_server(("127.0.0.1", port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        nodes.add_node(world.archive, name="destination", ae_title="STORESCP",
                       host="127.0.0.1", port=port)
        with scp(world.archive) as server:
            yield Dimse(server.port, received)
    finally:
        running.shutdown()


@contextmanager
def _association(dimse: Dimse, calling: str, *requested: str,
                 **options: Any) -> Iterator[Any]:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for context in requested:
        ae.add_requested_context(context, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", dimse.port, ae_title="LIGHTBOX", **options)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def _find(dimse: Dimse, calling: str, level: str, **keys: str) -> list[Dataset]:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    identifier.StudyInstanceUID = ""
    identifier.PatientID = ""
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    with _association(dimse, calling, contexts.STUDY_ROOT_FIND) as assoc:
        if not assoc.is_established:
            return []
        return [found for status, found in assoc.send_c_find(identifier, contexts.STUDY_ROOT_FIND)
                if status and status.Status in (0xFF00, 0xFF01) and found is not None]


@pytest.mark.parametrize(("calling", "visible"), [
    ("BOBNODE", F1), ("ERINNODE", frozenset({"S2"})), ("ALLNODE", frozenset({"S1", "S2", "S3",
                                                                              "S4"})),
    ("STRANGER", frozenset()),  # not a node: echo and store only
])
def test_c_find_sees_what_the_node_user_sees(
    world: World, dimse: Dimse, calling: str, visible: frozenset[str]
) -> None:
    found = {str(ds.StudyInstanceUID) for ds in _find(dimse, calling, "STUDY")}
    wanted = {world.studies[k].uid for k in visible}
    hidden = {world.studies[k].uid for k in ("S1", "S2", "S3", "S4")} - wanted
    assert wanted <= found and not found & hidden
    patients = {str(ds.PatientID) for ds in _find(dimse, calling, "STUDY", PatientID="PAT-S*")}
    assert not patients & {world.studies[k].patient_id for k in ("S1", "S2", "S3", "S4")
                           if k not in visible}
    for key in ("S1", "S2", "S3"):
        study = world.studies[key]
        below = _find(dimse, calling, "IMAGE", StudyInstanceUID=study.uid,
                      SeriesInstanceUID=study.series, SOPInstanceUID="")
        assert len(below) == (len(study.sops) if key in visible else 0), key


def _move(dimse: Dimse, calling: str, study: Study) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study.uid
    with _association(dimse, calling, contexts.STUDY_ROOT_MOVE) as assoc:
        assert assoc.is_established
        statuses = [s for s, _ in assoc.send_c_move(identifier, "STORESCP",
                                                   contexts.STUDY_ROOT_MOVE)]
    return statuses[-1]


def _get(dimse: Dimse, calling: str, study: Study) -> tuple[Dataset | None, list[str]]:
    """The final C-GET status (None when the GET context was refused) and what came."""
    received: list[str] = []

    def on_store(event: Event) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study.uid
    role = build_role(CTImageStorage, scp_role=True)
    with _association(dimse, calling, contexts.STUDY_ROOT_GET, CTImageStorage, ext_neg=[role],
                      evt_handlers=[(evt.EVT_C_STORE, on_store)]) as assoc:
        assert assoc.is_established
        if not any(cx.abstract_syntax == contexts.STUDY_ROOT_GET and cx.as_scu
                   for cx in assoc.accepted_contexts):
            return None, received
        statuses = [s for s, _ in assoc.send_c_get(identifier, contexts.STUDY_ROOT_GET)]
    return statuses[-1], received


# (node, study) -> the final status: Success with every instance, Success with
# none (a study the node's user cannot see), or refused (seen, not downloadable).
RETRIEVES = [
    ("ALLNODE", "S3", "all"), ("ERINNODE", "S2", "all"),
    ("BOBNODE", "S3", "none"), ("BOBNODE", "S2", "none"), ("ERINNODE", "S1", "none"),
    ("BOBNODE", "S1", "refused"),
]


@pytest.mark.parametrize(("calling", "key", "outcome"), RETRIEVES)
def test_c_move_sends_only_what_the_node_user_may_download(
    world: World, dimse: Dimse, calling: str, key: str, outcome: str
) -> None:
    study = world.studies[key]
    dimse.received.clear()
    final = _move(dimse, calling, study)
    _check_retrieve(final, dimse.received, study, outcome)


@pytest.mark.parametrize(("calling", "key", "outcome"), RETRIEVES)
def test_c_get_sends_only_what_the_node_user_may_download(
    world: World, dimse: Dimse, calling: str, key: str, outcome: str
) -> None:
    study = world.studies[key]
    final, received = _get(dimse, calling, study)
    assert final is not None
    _check_retrieve(final, received, study, outcome)


def _check_retrieve(final: Dataset, received: list[str], study: Study, outcome: str) -> None:
    if outcome == "refused":
        assert final.Status == Retrieve.NOT_AUTHORIZED
        assert received == []
        return
    assert final.Status == Retrieve.SUCCESS
    if outcome == "all":
        assert sorted(received) == sorted(study.sops)
        assert final.NumberOfCompletedSuboperations == len(study.sops)
    else:
        assert received == []
        assert final.get("NumberOfCompletedSuboperations", 0) == 0


def test_unknown_callers_may_not_retrieve(world: World, dimse: Dimse) -> None:
    study = world.studies["S1"]
    dimse.received.clear()
    with _association(dimse, "STRANGER", contexts.STUDY_ROOT_MOVE) as assoc:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = study.uid
        if assoc.is_established:
            statuses = [s for s, _ in assoc.send_c_move(identifier, "STORESCP",
                                                       contexts.STUDY_ROOT_MOVE)]
            assert statuses[-1].Status != Retrieve.SUCCESS
    final, received = _get(dimse, "STRANGER", study)
    assert (final is None or final.Status == Retrieve.NOT_AUTHORIZED) and received == []
    assert dimse.received == []


def test_c_store_by_a_node_acting_as_a_viewer_does_not_change_the_study(
    world: World, dimse: Dimse
) -> None:
    study = world.studies["S4"]
    before = _count(world, study)
    ds = ct_dataset(study=study.uid, series=study.series, patient_id="INTRUDER",
                    patient_name="Intruder^Ian")
    with _association(dimse, "BOBNODE", CTImageStorage) as assoc:
        assert assoc.is_established
        status = assoc.send_c_store(ds)
    assert status.Status == 0x0124  # Refused: Not Authorized, as STOW-RS answers
    assert _count(world, study) == before and not _stored(world, str(ds.SOPInstanceUID))
    # A new study from the node is the member's: it lands in their inbox.
    fresh = ct_dataset(patient_id="NODE-NEW", patient_name="Node^New")
    with _association(dimse, "BOBNODE", CTImageStorage) as assoc:
        assert assoc.send_c_store(fresh).Status == 0x0000
    assert world.principal("bob").may_read(str(fresh.StudyInstanceUID))
    assert not world.principal("carol").may_read(str(fresh.StudyInstanceUID))


# -- the download and re-share switches, by other ways round -------------------------------


def _fresh_study(world: World, name: str) -> Study:
    """A study of its own, so that a bug found here cannot spill into other tests."""
    made, parts = study_parts(name, "PAT-" + name.split("^")[0].upper())
    assert stow(world.client, world.url, world.tokens["admin"], parts).status_code == 200
    return made


def _scratch_folder(world: World, study: Study, member: str, role: folders.Role, *,
                    download: bool, reshare: bool) -> str:
    alice = world.principal("alice")
    made = folders.create_folder(world.archive, alice, "scratch").public_id
    folders.add_studies(world.archive, world.principal("admin"), made, [study.uid])
    folders.set_collaborator(world.archive, alice, made, member, role)
    folders.update_folder(world.archive, alice, made, allow_download=download,
                          allow_reshare=reshare)
    return made


def test_an_editor_cannot_move_a_study_into_more_rights(world: World) -> None:
    study = _fresh_study(world, "Mover^Max")
    scratch = _scratch_folder(world, study, "dave", folders.Role.EDITOR,
                              download=False, reshare=False)
    dave = world.principal("dave")
    inbox = folders.ensure_inbox(world.archive, dave).public_id
    with pytest.raises(Forbidden):  # the plain way is refused
        folders.add_studies(world.archive, dave, inbox, [study.uid])
    with suppress(Forbidden):
        folders.move_study(world.archive, dave, scratch, inbox, study.uid)
    zipped = world.client.get(f"{world.url}/download/studies/{study.uid}.zip",
                              headers=world.headers("dave"))
    assert zipped.status_code in (403, 404)
    with pytest.raises((Forbidden, NotFound)):
        sharing.create_share(world.archive, world.principal("dave"), study=study.uid)


def test_a_member_without_downloads_cannot_download_through_their_own_link(
    world: World
) -> None:
    study = _fresh_study(world, "Sharer^Sam")
    _scratch_folder(world, study, "mallory", folders.Role.VIEWER, download=False, reshare=True)
    direct = world.client.get(f"{world.url}/download/studies/{study.uid}.zip",
                              headers=world.headers("mallory"))
    assert direct.status_code == 403
    try:
        made = sharing.create_share(world.archive, world.principal("mallory"), study=study.uid)
    except Forbidden:
        return
    url = f"{world.url}/s/{made.token}"
    assert world.client.get(url + "/download.zip").status_code == 403
    whole = world.client.get(url + f"/dicom-web/studies/{study.uid}", headers={"Accept": "*/*"})
    assert whole.status_code == 403


def test_a_link_without_downloads_serves_no_whole_files(world: World) -> None:
    s1 = world.studies["S1"]
    _link, url = _share(world, allow_download=False)
    root = url + "/dicom-web"
    assert world.client.get(url + "/download.zip").status_code == 403
    for path in (f"/studies/{s1.uid}/metadata", f"{_instance(s1)}/frames/1",
                 f"{_instance(s1)}/rendered"):  # viewing still works
        assert world.client.get(root + path, headers={"Accept": "*/*"}).status_code == 200
    for path in (f"/studies/{s1.uid}", f"/studies/{s1.uid}/series/{s1.series}", _instance(s1)):
        answer = world.client.get(root + path, headers={"Accept": ANY_SYNTAX})
        assert answer.status_code == 403, path
        assert b"DICM" not in answer.content


def test_folder_roles(world: World) -> None:
    """Viewer < uploader < editor < owner; outsiders do not learn the folder exists."""
    archive, study = world.archive, _fresh_study(world, "Roles^Rita")
    scratch = _scratch_folder(world, study, "bob", folders.Role.VIEWER,
                              download=True, reshare=False)
    alice = world.principal("alice")
    folders.set_collaborator(archive, alice, scratch, "carol", folders.Role.UPLOADER)
    folders.set_collaborator(archive, alice, scratch, "dave", folders.Role.EDITOR)
    bob, carol, dave = (world.principal(u) for u in ("bob", "carol", "dave"))

    def refused(who: Any, error: type[Exception] = Forbidden) -> None:
        for attempt in (
            lambda: folders.comment(archive, who, scratch, "a note"),
            lambda: folders.remove_study(archive, who, scratch, study.uid),
            lambda: folders.set_collaborator(archive, who, scratch, "mallory",
                                             folders.Role.VIEWER),
            lambda: folders.update_folder(archive, who, scratch, allow_download=True),
            lambda: folders.delete_folder(archive, who, scratch),
        ):
            with pytest.raises(error):
                attempt()

    refused(bob)
    with pytest.raises(Forbidden):  # a viewer adds nothing, not even what they see
        folders.add_studies(archive, bob, scratch, [world.studies["S1"].uid])
    for outsider in ("erin", "mallory"):
        refused(world.principal(outsider), NotFound)
        with pytest.raises(NotFound):
            folders.open_folder(archive, world.principal(outsider), scratch)
    scoped = dataclasses.replace(alice, studies=frozenset({study.uid}), read_only=True)
    with pytest.raises(NotFound):
        folders.open_folder(archive, scoped, scratch)
    with pytest.raises(Forbidden):
        folders.create_folder(archive, scoped, "from a launch token")
    # An uploader adds what they may pass on (their own upload), nothing more.
    own, parts = study_parts("Carol^Own", "PAT-CAROL")
    assert stow(world.client, world.url, world.tokens["carol"], parts).status_code == 200
    assert folders.add_studies(archive, carol, scratch, [own.uid]) == 1
    assert _sees(world, "bob", own.uid)
    with pytest.raises(Forbidden):
        folders.comment(archive, carol, scratch, "a note")
    with pytest.raises(Forbidden):
        folders.remove_study(archive, carol, scratch, own.uid)
    # An editor comments and takes studies out; managing stays with the owner.
    folders.comment(archive, dave, scratch, "a note", study=study.uid)
    with pytest.raises(Forbidden):
        folders.update_folder(archive, dave, scratch, allow_download=False)
    folders.remove_study(archive, dave, scratch, own.uid)
    assert not _sees(world, "bob", own.uid) and _sees(world, "carol", own.uid)
    folders.update_folder(archive, world.principal("admin"), scratch, allow_reshare=True)


def test_a_c_move_of_several_studies_sends_the_downloadable_ones(
    world: World, dimse: Dimse
) -> None:
    """One study the node's user may download, one they may only view: the first
    is sent, the second left out (a request of only the second is refused)."""
    fresh = _fresh_study(world, "Mover^Max")
    _scratch_folder(world, fresh, "bob", folders.Role.VIEWER, download=True, reshare=False)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = [world.studies["S1"].uid, fresh.uid]
    dimse.received.clear()
    with _association(dimse, "BOBNODE", contexts.STUDY_ROOT_MOVE) as assoc:
        statuses = [s for s, _ in assoc.send_c_move(identifier, "STORESCP",
                                                   contexts.STUDY_ROOT_MOVE)]
    assert statuses[-1].Status == Retrieve.SUCCESS
    assert sorted(dimse.received) == sorted(fresh.sops)
