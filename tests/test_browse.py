"""The study browser over HTTP on both backends: lists, filters, paging, sorting,
totals, scope, the study page, thumbnails, viewer hand-over and deletion."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from sqlalchemy import Connection, insert, select

from lightbox.archive import Archive
from lightbox.index import browse as index
from lightbox.index.browse import SortKey, StudyFilter
from lightbox.index.schema import patients, studies, tokens
from lightbox.services import auth, browse
from lightbox.services.auth import Principal
from tests.conftest import RunningServer
from tests.factories import ct_dataset, stow_body, to_bytes
from tests.grants import grant

DASH = "\u2013"  # an en dash, as in "1-25 of 103,482 studies" on the page


@dataclass(frozen=True)
class Study:
    uid: str
    series: str
    sops: list[str]


PEOPLE = [
    # name, id, date, accession, modality, description
    ("DOE^JANE", "P-001", "20240110", "ACC-100", "CT", "Chest"),
    ("DOE^JANE", "P-001", "20240315", "ACC-101", "MR", "Knee"),
    ("DOERING^MAX", "P-002", "20230105", "ACC-200", "CT", "Head"),
    ("Smith^Anna", "P-003", "20221220", "ACC-300", "US", "Abdomen"),
    ("ZETA^ZED", "P-004", "20240601", "ACC-400", "MR", "Spine"),
]


def _store(server: RunningServer, datasets: list[Dataset]) -> None:
    body, content_type = stow_body([to_bytes(ds) for ds in datasets])
    answer = httpx.post(
        server.dicomweb + "/studies",
        content=body,
        headers={**server.headers, "Content-Type": content_type},
    )
    assert answer.status_code == 200, answer.text


def _study(name: str, pid: str, day: str, acc: str, modality: str, desc: str, n: int = 2) -> (
    list[Dataset]
):
    first = ct_dataset(patient_name=name, patient_id=pid, instance_number=1)
    out = [first]
    for i in range(2, n + 1):
        out.append(ct_dataset(study=first.StudyInstanceUID, series=first.SeriesInstanceUID,
                              patient_name=name, patient_id=pid, instance_number=i))
    for ds in out:
        ds.StudyDate, ds.AccessionNumber = day, acc
        ds.Modality, ds.StudyDescription = modality, desc
    return out


@pytest.fixture
def filled(server: RunningServer) -> list[Study]:
    studies = []
    for person in PEOPLE:
        datasets = _study(*person)
        _store(server, datasets)
        first = datasets[0]
        studies.append(Study(first.StudyInstanceUID, first.SeriesInstanceUID,
                             [d.SOPInstanceUID for d in datasets]))
    return studies


def _get(server: RunningServer, path: str, **params: str) -> httpx.Response:
    return httpx.get(server.url + path, params=params, headers=server.headers)


def _row_uids(html: str) -> list[str]:
    """Study UIDs in list order (each row links its study twice)."""
    found = re.findall(r'href="/browse/studies/([0-9.]+)"', html)
    return list(dict.fromkeys(found))


def test_list_groups_studies_under_patients_with_totals(
    server: RunningServer, filled: list[Study]
) -> None:
    page = _get(server, "/browse")
    assert page.status_code == 200
    assert f"1{DASH}5 of 5 studies" in page.text
    assert "DOE, JANE" in page.text and "P-001" in page.text and "born 1980-01-01" in page.text
    # Newest study first; the one with no other study date in 2024-06 leads.
    assert _row_uids(page.text)[0] == filled[4].uid
    assert "Chest" in page.text and "ACC-101" in page.text


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"name": "doe"}, [0, 1, 2]),  # prefix, case-insensitive
        ({"name": "doe^j"}, [0, 1]),
        ({"name": "smith"}, [3]),  # stored in mixed case
        ({"name": "*ANNA"}, [3]),  # a leading wildcard searches anywhere
        ({"name": "D?E^*"}, [0, 1]),
        ({"id": "P-002"}, [2]),
        ({"id": "P-00*"}, [0, 1, 2, 3, 4]),
        ({"accession": "ACC-300"}, [3]),
        ({"from": "2024-01-01"}, [0, 1, 4]),
        ({"from": "2023-01-01", "to": "20231231"}, [2]),
        ({"to": "2022-12-31"}, [3]),
        ({"modality": "MR"}, [1, 4]),
        ({"modality": "ct", "name": "DOE"}, [0, 2]),
        ({"name": "100%_"}, []),  # LIKE metacharacters are literal
    ],
)
def test_filters_narrow_the_list(
    server: RunningServer, filled: list[Study], params: dict[str, str], expected: list[int]
) -> None:
    page = _get(server, "/browse", **params)
    assert page.status_code == 200
    assert sorted(_row_uids(page.text)) == sorted(filled[i].uid for i in expected)
    if expected:
        assert f"of {len(expected)} stud" in page.text
    else:
        assert "No studies match." in page.text


def test_pages_and_sort_orders(server: RunningServer, filled: list[Study]) -> None:
    first = _get(server, "/browse", size="2")
    second = _get(server, "/browse", size="2", page="2")
    last = _get(server, "/browse", size="2", page="3")
    assert f"1{DASH}2 of 5 studies" in first.text and f"3{DASH}4 of 5" in second.text
    assert f"5{DASH}5 of 5" in last.text and "Page 3 of 3" in last.text
    by_date = [filled[i].uid for i in (4, 1, 0, 2, 3)]
    assert _row_uids(first.text) + _row_uids(second.text) + _row_uids(last.text) == by_date
    oldest = _get(server, "/browse", sort="date", dir="asc")
    assert _row_uids(oldest.text) == by_date[::-1]
    by_name = _get(server, "/browse", sort="name")
    # The database's own text order (it differs between backends on "^"), with a
    # patient's studies together, oldest first.
    order = [[s.uid for s in filled].index(u) for u in _row_uids(by_name.text)]
    assert order.index(1) == order.index(0) + 1 and order[-1] == 4
    by_name_desc = _get(server, "/browse", sort="name", dir="desc")
    assert _row_uids(by_name_desc.text)[0] == filled[4].uid
    by_id_desc = _get(server, "/browse", sort="id", dir="desc")
    assert _row_uids(by_id_desc.text)[0] == filled[4].uid
    assert 'href="/browse?sort=id&amp;dir=asc"' in by_id_desc.text.replace("size=25&amp;", "")


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"sort": "1;DROP TABLE studies"}, 200),
        ({"sort": "name", "dir": "sideways"}, 200),
        ({"page": "-1"}, 200),
        ({"page": "10^9"}, 200),
        ({"page": "1000000000"}, 200),
        ({"page": "9" * 40}, 200),
        ({"size": "100000"}, 200),
        ({"size": "0"}, 200),
        ({"from": "notadate"}, 400),
        ({"to": "2024-02-30"}, 400),
        ({"from": "2024-05-01", "to": "2024-01-01"}, 400),
        ({"modality": "CT' OR 1=1 --"}, 400),
        ({"name": "x" * 500}, 400),
        ({"name": "a\x00b"}, 400),
        ({"name": "' OR ''='"}, 200),
    ],
)
def test_hostile_query_strings_are_refused_or_clamped(
    server: RunningServer, filled: list[Study], params: dict[str, str], status: int
) -> None:
    page = _get(server, "/browse", **params)
    assert page.status_code == status, page.text
    assert page.headers["content-type"].startswith("text/html")
    if status == 400:
        assert 'role="alert"' in page.text
    if params.get("page") not in (None, "-1"):
        assert f"5{DASH}5 of 5" in page.text or f"1{DASH}5 of 5" in page.text


def test_scoped_token_sees_only_its_studies(server: RunningServer, filled: list[Study]) -> None:
    token = auth.create_token(server.archive, studies=[filled[2].uid], read_only=True)
    headers = {"Authorization": f"Bearer {token}"}
    page = httpx.get(server.url + "/browse", headers=headers)
    assert _row_uids(page.text) == [filled[2].uid] and f"1{DASH}1 of 1 study" in page.text
    hidden = httpx.get(server.url + f"/browse/studies/{filled[0].uid}", headers=headers)
    assert hidden.status_code == 404
    thumb = httpx.get(
        server.url + f"/browse/thumbnails/{filled[0].uid}/{filled[0].series}.jpg", headers=headers
    )
    assert thumb.status_code == 404
    own = httpx.get(server.url + f"/browse/studies/{filled[2].uid}", headers=headers)
    assert own.status_code == 200
    assert "/key-images" not in own.text and "Delete study" not in own.text


def test_study_page_shows_series_attributes_and_actions(
    server: RunningServer, filled: list[Study]
) -> None:
    study = filled[0]
    page = _get(server, f"/browse/studies/{study.uid}")
    assert page.status_code == 200
    html = page.text
    assert f"/browse/thumbnails/{study.uid}/{study.series}.jpg" in html
    assert f"/viewer/viewer?StudyInstanceUIDs={study.uid}" in html
    assert f"/download/studies/{study.uid}.zip" in html
    assert f'action="/launch/slicer/{study.uid}"' in html
    assert f'action="/launch/weasis/{study.uid}"' in html
    assert 'action="/key-images"' in html and f'value="{study.sops[0]}"' in html
    assert "Delete study" in html  # the server's token is an administrator's
    assert "(0010,0010)" in html and "Patient&#39;s Name" in html and "DOE^JANE" in html
    second = _get(server, f"/browse/studies/{study.uid}", series=study.series, sop=study.sops[1])
    assert re.search(rf'<option value="{study.sops[1]}" selected>', second.text)


def test_attribute_table_nests_sequences(server: RunningServer) -> None:
    ds = ct_dataset(patient_name="NEST^ED")
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "T-D3000", "SRT", "Chest"
    ds.AnatomicRegionSequence = Sequence([item])
    _store(server, [ds])
    page = _get(server, f"/browse/studies/{ds.StudyInstanceUID}")
    html = page.text
    assert "(0008,2218)" in html and "1 item" in html and "Item 1" in html
    assert re.search(r'class="depth-1"><td class="tag">\(0008,0100\)</td>', html)


def test_key_image_form_adds_a_key_object_series(
    server: RunningServer, filled: list[Study]
) -> None:
    study = filled[0]
    page = _get(server, f"/browse/studies/{study.uid}").text
    form = re.search(r'<form method="post" action="/key-images".*?</form>', page, re.S)
    assert form is not None
    fields = dict(re.findall(r'name="(\w+)" value="([^"]*)"', form.group(0)))
    assert fields == {"study": study.uid, "series": study.series, "sop": study.sops[0],
                      "frame": "1"}
    marked = httpx.post(server.url + "/key-images", data=fields, headers=server.headers)
    assert marked.status_code == 303
    assert marked.headers["location"] == f"/browse/studies/{study.uid}"
    after = _get(server, marked.headers["location"]).text
    assert "<strong>KO" in after
    ko_series = re.findall(rf"/browse/thumbnails/{re.escape(study.uid)}/([0-9.]+)\.jpg", after)
    placeholder = _get(server, f"/browse/thumbnails/{study.uid}/{ko_series[-1]}.jpg")
    assert placeholder.headers["content-type"] in ("image/svg+xml", "image/jpeg")


@pytest.mark.parametrize("uid", ["1.2.3.4.5.6.7", "not-a-uid", "1.2..3"])
def test_study_page_of_unknown_study(server: RunningServer, uid: str) -> None:
    page = _get(server, f"/browse/studies/{uid}")
    assert page.status_code in (400, 404)
    assert page.headers["content-type"].startswith("text/html")
    if uid == "1.2.3.4.5.6.7":
        assert page.status_code == 404


def test_pages_need_a_session(server: RunningServer) -> None:
    answer = httpx.get(server.url + "/browse?name=x")
    assert answer.status_code == 303
    assert answer.headers["location"] == "/login?next=%2Fbrowse%3Fname%3Dx"


def _cached_thumbnails(server: RunningServer) -> list[Path]:
    return sorted((Path(server.archive.settings.data) / "cache" / "thumbnails").rglob("*.jpg"))


def test_thumbnails_are_rendered_once_and_follow_the_series(
    server: RunningServer, filled: list[Study]
) -> None:
    study = filled[0]
    path = f"/browse/thumbnails/{study.uid}/{study.series}.jpg"
    first = _get(server, path)
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    assert first.content[:2] == b"\xff\xd8"
    cached = _cached_thumbnails(server)
    assert len(cached) == 1 and study.uid not in str(cached[0])
    mtime = cached[0].stat().st_mtime_ns
    again = httpx.get(server.url + path, headers={**server.headers,
                                                  "If-None-Match": first.headers["etag"]})
    assert again.status_code == 304
    assert _get(server, path).content == first.content
    assert cached[0].stat().st_mtime_ns == mtime  # served from the cache
    more = ct_dataset(study=study.uid, series=study.series, patient_name="DOE^JANE",
                      patient_id="P-001", instance_number=3)
    _store(server, [more])
    changed = _get(server, path)
    assert changed.status_code == 200 and changed.headers["etag"] != first.headers["etag"]
    assert _cached_thumbnails(server) != cached and len(_cached_thumbnails(server)) == 1
    assert _get(server, f"/browse/thumbnails/{study.uid}/1.2.3.999.jpg").status_code == 404
    other = filled[1]
    wrong_study = _get(server, f"/browse/thumbnails/{other.uid}/{study.series}.jpg")
    assert wrong_study.status_code == 404


def test_series_without_pixels_gets_a_placeholder(server: RunningServer) -> None:
    ds = ct_dataset()
    del ds.PixelData
    _store(server, [ds])
    got = _get(server, f"/browse/thumbnails/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}.jpg")
    assert got.status_code == 200 and got.headers["content-type"] == "image/svg+xml"


@contextmanager
def _session(server: RunningServer, name: str, *, admin: bool) -> Iterator[httpx.Client]:
    auth.add_user(server.archive, name, "long enough pw", is_admin=admin)
    client = httpx.Client(base_url=server.url, headers={"Origin": server.url})
    answer = client.post("/login", data={"username": name, "password": "long enough pw"})
    assert answer.status_code == 303
    try:
        yield client
    finally:
        client.close()


def test_delete_needs_an_administrator_the_same_origin_and_a_confirmation(
    server: RunningServer, filled: list[Study]
) -> None:
    target = f"/browse/studies/{filled[3].uid}/delete"
    with _session(server, "nurse", admin=False) as client:
        assert client.post(target, data={"confirm": "yes"}).status_code == 403
    with _session(server, "boss", admin=True) as client:
        forged = client.post(target, data={"confirm": "yes"},
                             headers={"Origin": "http://evil.example"})
        assert forged.status_code == 403
        assert client.post(target, data={}).status_code == 400
        thumb = client.get(f"/browse/thumbnails/{filled[3].uid}/{filled[3].series}.jpg")
        assert thumb.status_code == 200 and _cached_thumbnails(server)
        done = client.post(target, data={"confirm": "yes"})
        assert done.status_code == 303 and done.headers["location"] == "/browse?deleted=1"
        assert client.get(f"/browse/studies/{filled[3].uid}").status_code == 404
        listing = client.get("/browse?deleted=1")
        assert "The study was deleted." in listing.text and "of 4 studies" in listing.text
    assert _cached_thumbnails(server) == []


def test_slicer_link_carries_a_read_only_token_for_that_study(
    server: RunningServer, filled: list[Study]
) -> None:
    study, other = filled[0], filled[2]
    with _session(server, "reader", admin=False) as client:
        grant(server.archive, "reader", study.uid, other.uid)
        answer = client.post(f"/launch/slicer/{study.uid}")
        assert answer.status_code == 303
        assert client.post(f"/launch/slicer/{study.uid}",
                           headers={"Origin": "http://evil.example"}).status_code == 403
        assert client.post("/launch/slicer/1.2.3.4.5").status_code == 404
        assert client.post(f"/launch/osirix/{study.uid}").status_code == 404
    link = urlsplit(answer.headers["location"])
    assert (link.scheme, link.netloc, link.path) == ("slicer", "viewer", "/")
    query = parse_qs(link.query)
    assert query["studyUID"] == [study.uid]
    assert query["dicomweb_endpoint"] == [server.dicomweb]
    bearer = {"Authorization": f"Bearer {query['access_token'][0]}"}
    found = httpx.get(server.dicomweb + "/studies", headers=bearer)
    assert found.status_code == 200
    assert [s["0020000D"]["Value"][0] for s in found.json()] == [study.uid]
    meta = httpx.get(server.dicomweb + f"/studies/{study.uid}/metadata", headers=bearer)
    assert meta.status_code == 200 and len(meta.json()) == 2
    hidden = httpx.get(server.dicomweb + f"/studies/{other.uid}/metadata", headers=bearer)
    assert hidden.status_code == 404
    body, content_type = stow_body([to_bytes(ct_dataset())])
    stow = httpx.post(server.dicomweb + "/studies", content=body,
                      headers={**bearer, "Content-Type": content_type})
    assert stow.status_code == 403
    removal = httpx.delete(server.dicomweb + f"/studies/{study.uid}", headers=bearer)
    assert removal.status_code == 403


def test_weasis_link_runs_its_dicomweb_command(
    server: RunningServer, filled: list[Study]
) -> None:
    answer = httpx.post(server.url + f"/launch/weasis/{filled[1].uid}", headers=server.headers)
    assert answer.status_code == 303
    location = answer.headers["location"]
    assert location.startswith("weasis://%24dicom%3Ars%20")
    command = unquote(location.removeprefix("weasis://"))
    match = re.fullmatch(
        r'\$dicom:rs --url "(.+)" -r "studyUID=(.+)" -H "Authorization: Bearer (lbx_\S+)"', command
    )
    assert match is not None, command
    assert match.group(1) == server.dicomweb and match.group(2) == filled[1].uid
    token = match.group(3)
    principal = auth.Authenticator(server.archive).authenticate(token)
    assert principal.studies == frozenset({filled[1].uid}) and principal.read_only
    with server.archive.db.read() as conn:
        expires = conn.execute(
            select(tokens.c.expires_at).where(tokens.c.label == "weasis")
        ).scalar_one()
    left = expires.replace(tzinfo=expires.tzinfo or UTC) - datetime.now(UTC)
    assert timedelta(hours=1, minutes=55) < left <= timedelta(hours=2)


# ---------------------------------------------------------------------------
# 100,000 studies: pages and totals stay index work.

SCALE = 100_000
MODALITIES = ("\\CT\\", "\\MR\\", "\\CT\\US\\", "\\DX\\")


def _scale_rows() -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    now = datetime.now(UTC)
    patient_rows, study_rows = [], []
    for p in range(1, SCALE // 2 + 1):
        family = "SMITH" if p % 97 == 0 else f"NAME{p:06d}"
        name, pid = f"{family}^GIVEN", f"PID{p:07d}"
        patient_rows.append({"pk": p, "identity": f"|{pid}", "patient_id": pid,
                             "patient_name": name})
        for s in range(2):
            pk = 2 * (p - 1) + s + 1
            study_rows.append({
                "pk": pk, "patient_pk": p, "patient_id": pid, "patient_name": name,
                "study_instance_uid": f"1.2.999.{p}.{s}",
                "study_date": f"{2000 + pk % 25}{1 + pk % 12:02d}{1 + pk % 28:02d}",
                "study_time": f"{pk % 24:02d}0000", "accession_number": f"A{pk:08d}",
                "modalities_in_study": MODALITIES[pk % len(MODALITIES)],
                "number_of_series": 1, "number_of_instances": 1,
                "created_at": now, "updated_at": now,
            })
    return patient_rows, study_rows


def _plan(conn: Connection, stmt: Any) -> str:
    sql = str(stmt.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
    prefix = "EXPLAIN QUERY PLAN " if conn.dialect.name == "sqlite" else "EXPLAIN "
    return "\n".join(str(row[-1]) for row in conn.exec_driver_sql(prefix + sql))


def test_hundred_thousand_studies_page_and_count_through_indexes(archive: Archive) -> None:
    patient_rows, study_rows = _scale_rows()
    started = time.perf_counter()
    with archive.db.write() as conn:
        for table, rows in ((patients, patient_rows), (studies, study_rows)):
            for at in range(0, len(rows), 20_000):
                conn.execute(insert(table), rows[at : at + 20_000])
        conn.exec_driver_sql("ANALYZE")
    filled = time.perf_counter() - started
    admin = Principal(user="admin", is_admin=True)
    timings = {}

    def timed(label: str, listing: browse.Listing) -> browse.StudyPage:
        begin = time.perf_counter()
        found = browse.list_studies(archive, admin, listing)
        timings[label] = (time.perf_counter() - begin) * 1000
        return found

    first = timed("page 1 by date", browse.parse_listing({}))
    assert first.total == SCALE and len(first.rows) == 25 and (first.first, first.last) == (1, 25)
    newest = max((r["study_date"], r["study_time"]) for r in study_rows)
    assert (first.rows[0].study_date, first.rows[0].study_time) == newest
    smiths = timed("name=smith", browse.parse_listing({"name": "smith"}))
    assert smiths.total == sum(1 for r in study_rows if str(r["patient_name"]).startswith("SMITH"))
    assert {r.patient_name for r in smiths.rows} == {"SMITH^GIVEN"}
    mixed = timed("MR in 2010", browse.parse_listing(
        {"modality": "MR", "from": "2010-01-01", "to": "2010-12-31"}))
    assert mixed.total == sum(
        1 for r in study_rows
        if r["modalities_in_study"] == "\\MR\\" and str(r["study_date"]).startswith("2010")
    )
    last = timed("page 10^9 by name", browse.parse_listing({"sort": "name", "page": "10" * 9}))
    assert last.page == last.pages == SCALE // 25 and len(last.rows) == 25
    scoped = browse.list_studies(
        archive, Principal(user="x", is_admin=False, studies=frozenset({"1.2.999.7.1"})),
        browse.parse_listing({}),
    )
    assert scoped.total == 1 and scoped.rows[0].study_instance_uid == "1.2.999.7.1"
    print(f"\n{archive.db.engine.dialect.name}: filled {SCALE} studies in {filled:.1f} s; "
          + "; ".join(f"{k} {v:.1f} ms" for k, v in timings.items()))
    _check_plans(archive)


def _check_plans(archive: Archive) -> None:
    """The list and the name search are index scans, not sorts of the whole table."""
    with archive.db.read() as conn:
        by_date = _plan(conn, index.list_statement(
            conn, StudyFilter(), SortKey.STUDY_DATE, descending=True, limit=25, offset=0))
        by_name = _plan(conn, index.list_statement(
            conn, StudyFilter(), SortKey.PATIENT_NAME, descending=False, limit=25, offset=0))
        name_count = _plan(conn, index.count_statement(conn, StudyFilter(patient_name="smi")))
    print(f"plans:\n{by_date}\n--\n{by_name}\n--\n{name_count}")
    assert "ix_studies_date_time" in by_date
    if archive.db.is_sqlite:
        assert "ix_studies_name_id_date" in by_name
        assert "TEMP B-TREE" not in by_date + by_name
        assert "ix_studies_patient_name_nocase" in name_count
    else:
        # PostgreSQL may walk either name index, finishing ties with an incremental sort.
        assert "Index Scan using ix_studies_patient_name" in by_name
        assert not re.search(r"(?<!Incremental )Sort  \(", by_date + by_name)
        assert "ix_studies_patient_name_upper" in name_count
