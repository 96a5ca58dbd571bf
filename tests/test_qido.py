"""QIDO-RS matching over real HTTP on SQLite and PostgreSQL (PS3.18 §10.6, PS3.4 C.2.2.2).

Ten small studies are stored once per backend; every test only reads them.
The server cap (``qido_max_results``) gets an archive of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select

from lightbox.archive import Archive
from lightbox.dicom.attributes import QueryLevel
from lightbox.dicom.query import MatchType, Query
from lightbox.dimse.contexts import STUDY_ROOT_FIND
from lightbox.dimse.query import find_request
from lightbox.index import search as index_search
from lightbox.index.schema import studies
from lightbox.services import auth
from lightbox.services.ingest import Offer, Status, store_instances
from tests.conftest import BACKENDS, RunningServer, database_url, make_settings, serving
from tests.factories import ROOT, ct_dataset, write

# key: (PatientName, PatientID, StudyDate, StudyTime, modalities of its series, extra)
STUDIES: dict[str, tuple[str, str, str, str, tuple[str, ...], dict[str, Any]]] = {
    "john": ("Doe^John", "P1", "20240105", "083000", ("CT",),
             {"ReferringPhysicianName": "House^Gregory", "StudyDescription": "Chest CT"}),
    "jane": ("DOE^JANE", "P2", "20240131", "235959.5", ("MR", "CT"),
             {"StudyDescription": "Brain MR"}),
    "anna": ("Smith^Anna^Maria", "P3", "20240201", "120000", ("US",),
             {"StudyDescription": "Abdomen"}),
    "pct": ("50%_off", "P4", "20231231", "000000", ("CT",), {}),
    "zeros": ("5000off", "P5", "20231230", "000001", ("CT",), {}),
    "x_off": ("50x_off", "P6", "20231229", "0930", ("CT",), {}),
    "quote": ("O'Brien^Sean", "P7';--", "20240115", "101500", ("DX",),
              {"AccessionNumber": "A%1"}),
    "drop": ("Robert'); DROP TABLE studies;--", "P8", "20240116", "101501", ("CR",),
             {"AccessionNumber": "A_1"}),
    "plain": ("Plain^Patient", "P9", "20240117", "140000", ("OT",),
              {"AccessionNumber": "AB1", "StudyDescription": ""}),
    "umlaut": ("Müller^Jürgen", "PÜ", "", "", ("MG",), {}),
}


@dataclass
class Corpus:
    server: RunningServer
    http: httpx.Client
    uids: dict[str, str]  # study key -> StudyInstanceUID
    instances: dict[str, list[str]]  # study key -> SOP Instance UIDs

    def get(self, path: str, **params: Any) -> httpx.Response:
        return self.http.get(self.server.dicomweb + path, params=params)

    def keys(self, path: str, **params: Any) -> set[str]:
        """Which of STUDIES the matches belong to."""
        response = self.get(path, **params)
        assert response.status_code == 200, response.text
        by_uid = {v: k for k, v in self.uids.items()}
        return {by_uid[item["0020000D"]["Value"][0]] for item in response.json()}


def _store(archive: Archive, folder: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    uids: dict[str, str] = {}
    instances: dict[str, list[str]] = {}
    offers = []
    for key, (name, pid, date, time, modalities, extra) in STUDIES.items():
        study = uids[key] = generate_uid(prefix=ROOT)
        for number, modality in enumerate(modalities, start=1):
            ds = ct_dataset(study=study, patient_name=name, patient_id=pid, StudyDate=date,
                            StudyTime=time, Modality=modality, SeriesNumber=number,
                            instance_number=number, SliceThickness=f"{number * 2.5}",
                            PatientWeight="71.5", Manufacturer="ACME", WindowCenter="40",
                            **extra)
            instances.setdefault(key, []).append(ds.SOPInstanceUID)
            offers.append(Offer(write(ds, folder / f"{ds.SOPInstanceUID}.dcm"), key))
    outcomes = store_instances(archive, offers)
    assert [o.status for o in outcomes] == [Status.STORED] * len(offers)
    return uids, instances


@pytest.fixture(scope="module", params=BACKENDS)
def corpus(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Corpus]:
    data = tmp_path_factory.mktemp(f"qido-{request.param}")
    with database_url(str(request.param), data) as url:
        archive = Archive.open(make_settings(data, url))
        try:
            uids, instances = _store(archive, tmp_path_factory.mktemp("files"))
            with serving(archive) as server, httpx.Client(headers=server.headers) as http:
                yield Corpus(server, http, uids, instances)
        finally:
            archive.close()


@pytest.fixture
def capped(backend: str, tmp_path: Path) -> Iterator[Corpus]:
    """The same studies behind a server that returns at most 4 results per query."""
    data = tmp_path / "data"
    with database_url(backend, data) as url:
        archive = Archive.open(make_settings(data, url, qido_max_results=4))
        try:
            (tmp_path / "files").mkdir()
            uids, instances = _store(archive, tmp_path / "files")
            with serving(archive) as server, httpx.Client(headers=server.headers) as http:
                yield Corpus(server, http, uids, instances)
        finally:
            archive.close()


ALL = set(STUDIES)


# --- single value, wildcards, person names ------------------------------------------------


def test_single_value(corpus: Corpus) -> None:
    assert corpus.keys("/studies", PatientID="P1") == {"john"}
    assert corpus.keys("/studies", PatientID="P") == set()
    assert corpus.keys("/studies", StudyDescription="Brain MR") == {"jane"}
    assert corpus.keys("/studies", StudyDescription="brain mr") == set()  # case-sensitive
    # Person names match case-insensitively.
    assert corpus.keys("/studies", PatientName="doe^john") == {"john"}
    assert corpus.keys("/studies", PatientName="Müller^Jürgen") == {"umlaut"}
    assert corpus.keys("/studies", PatientName="müller^jürgen") == {"umlaut"}
    assert corpus.keys("/studies", PatientID="PÜ") == {"umlaut"}
    assert corpus.keys("/studies", **{"00100020": "P2"}) == {"jane"}


def test_wildcards(corpus: Corpus) -> None:
    assert corpus.keys("/studies", PatientName="doe*") == {"john", "jane"}
    assert corpus.keys("/studies", PatientName="D?E^J*") == {"john", "jane"}
    assert corpus.keys("/studies", PatientName="*ANNA*") == {"anna"}
    assert corpus.keys("/studies", PatientName="Mü*") == {"umlaut"}
    assert corpus.keys("/studies", PatientName="mü*^j?rgen") == {"umlaut"}
    assert corpus.keys("/studies", PatientName="*") == ALL
    assert corpus.keys("/studies", PatientID="P?") == ALL - {"quote"}
    assert corpus.keys("/studies", StudyDescription="B*") == {"jane"}
    # A lone "*" is universal matching: empty values match too (PS3.4 C.2.2.2.4).
    assert corpus.keys("/studies", StudyDescription="*") == ALL
    assert corpus.keys("/studies", StudyDescription="?*") == ALL - {"plain"}


def test_wildcards_on_other_strings_are_case_sensitive(corpus: Corpus) -> None:
    # PS3.4 C.2.2.2.4: only person names may match case-insensitively; both
    # backends must agree (SQLite's LIKE alone is case-insensitive).
    assert corpus.keys("/studies", StudyDescription="Chest C*") == {"john"}
    assert corpus.keys("/studies", StudyDescription="chest c*") == set()
    assert corpus.keys("/studies", StudyDescription="*CT") == {"john"}
    assert corpus.keys("/studies", StudyDescription="*ct") == set()
    assert corpus.keys("/studies", StudyDescription="?rain*") == {"jane"}
    assert corpus.keys("/studies", StudyDescription="?RAIN*") == set()
    assert corpus.keys("/studies", ModalitiesInStudy="mr") == set()


def test_sql_and_like_metacharacters_are_literal(corpus: Corpus) -> None:
    assert corpus.keys("/studies", PatientName="50%_off") == {"pct"}
    assert corpus.keys("/studies", PatientName="50%") == set()
    assert corpus.keys("/studies", PatientName="50%*") == {"pct"}
    assert corpus.keys("/studies", PatientName="50_*") == set()
    assert corpus.keys("/studies", PatientName="50?_off") == {"pct", "x_off"}
    assert corpus.keys("/studies", PatientName="*_off") == {"pct", "x_off"}
    assert corpus.keys("/studies", PatientName="*%*") == {"pct"}
    assert corpus.keys("/studies", PatientName="O'Brien^Sean") == {"quote"}
    assert corpus.keys("/studies", PatientName="o'b*") == {"quote"}
    assert corpus.keys("/studies", PatientID="P7';--") == {"quote"}
    assert corpus.keys("/studies", PatientName="Robert'); DROP TABLE studies;--") == {"drop"}
    assert corpus.keys("/studies", PatientName="*;--") == {"drop"}
    assert corpus.keys("/studies", AccessionNumber="A%1") == {"quote"}
    assert corpus.keys("/studies", AccessionNumber="A_1") == {"drop"}
    assert corpus.keys("/studies", AccessionNumber="A_*") == {"drop"}
    # The table is still there.
    assert corpus.keys("/studies") == ALL


def test_fuzzy_person_names(corpus: Corpus) -> None:
    assert corpus.keys("/studies", PatientName="jan", fuzzymatching="true") == {"jane"}
    assert corpus.keys("/studies", PatientName="jan") == set()
    assert corpus.keys("/studies", PatientName="ann", fuzzymatching="true") == {"anna"}
    assert corpus.keys("/studies", PatientName="mari", fuzzymatching="true") == {"anna"}
    assert corpus.keys("/studies", PatientName="smi", fuzzymatching="true") == {"anna"}
    assert corpus.keys("/studies", PatientName="ohn", fuzzymatching="true") == set()
    assert corpus.keys("/studies", PatientName="DOE", fuzzymatching="true") == {"john", "jane"}
    assert corpus.keys("/studies", PatientName="50%", fuzzymatching="true") == {"pct"}
    assert corpus.keys("/studies", PatientName="Mül", fuzzymatching="true") == {"umlaut"}
    assert corpus.keys("/studies", PatientName="jür", fuzzymatching="true") == {"umlaut"}
    assert corpus.keys("/studies", ReferringPhysicianName="hou", fuzzymatching="true") == {"john"}
    assert corpus.keys("/studies", ReferringPhysicianName="greg",
                       fuzzymatching="true") == {"john"}


# --- dates, times, UID lists, multi-valued -----------------------------------------------------


def test_date_ranges(corpus: Corpus) -> None:
    january = {"john", "jane", "quote", "drop", "plain"}
    assert corpus.keys("/studies", StudyDate="20240101-20240131") == january
    assert corpus.keys("/studies", StudyDate="20240105") == {"john"}
    assert corpus.keys("/studies", StudyDate="20240131-") == {"jane", "anna"}
    assert corpus.keys("/studies", StudyDate="-20231231") == {"pct", "zeros", "x_off"}
    assert corpus.keys("/studies", StudyDate="20240116-20240116") == {"drop"}
    assert corpus.keys("/studies", PatientBirthDate="19800101") == ALL


def test_time_ranges(corpus: Corpus) -> None:
    assert corpus.keys("/studies", StudyTime="080000-090000") == {"john"}
    assert corpus.keys("/studies", StudyTime="2300-") == {"jane"}
    assert corpus.keys("/studies", StudyTime="-000000") == {"pct"}
    # An upper bound given to the minute includes that whole minute.
    assert corpus.keys("/studies", StudyTime="-0000") == {"pct", "zeros"}
    assert corpus.keys("/studies", StudyTime="1015-1015") == {"quote", "drop"}
    assert corpus.keys("/studies", StudyTime="-1015") == {
        "pct", "zeros", "x_off", "john", "quote", "drop"}
    assert corpus.keys("/studies", StudyTime="101500-101500") == {"quote"}
    assert corpus.keys("/studies", StudyTime="10:15-10:16") == {"quote", "drop"}
    assert corpus.keys("/studies", StudyTime="101500") == {"quote"}
    assert corpus.keys("/studies", StudyTime="0930") == {"x_off"}
    assert corpus.keys("/studies", StudyDate="20240115-", StudyTime="1015-1100") == {
        "quote", "drop"}


def test_uid_lists(corpus: Corpus) -> None:
    john, anna = corpus.uids["john"], corpus.uids["anna"]
    assert corpus.keys("/studies", StudyInstanceUID=f"{john}\\{anna}") == {"john", "anna"}
    assert corpus.keys("/studies", StudyInstanceUID=f"{john},{anna}") == {"john", "anna"}
    assert corpus.keys("/studies", StudyInstanceUID=john) == {"john"}
    assert corpus.keys("/studies", StudyInstanceUID="1.2.3.4") == set()
    sops = corpus.instances["jane"]
    response = corpus.get("/instances", SOPInstanceUID=",".join([*sops, "1.2.3"]))
    assert sorted(i["00080018"]["Value"][0] for i in response.json()) == sorted(sops)


def test_modalities_in_study(corpus: Corpus) -> None:
    assert corpus.keys("/studies", ModalitiesInStudy="MR") == {"jane"}
    assert corpus.keys("/studies", ModalitiesInStudy="US\\MR") == {"jane", "anna"}
    assert corpus.keys("/studies", ModalitiesInStudy="CT") == {
        "john", "jane", "pct", "zeros", "x_off"}
    assert corpus.keys("/studies", ModalitiesInStudy="C") == set()
    jane = corpus.get("/studies", PatientID="P2").json()[0]
    assert sorted(jane["00080061"]["Value"]) == ["CT", "MR"]


def test_series_and_instance_levels(corpus: Corpus) -> None:
    assert corpus.keys("/series", Modality="MR") == {"jane"}
    assert corpus.keys("/series", PatientName="doe*", Modality="CT") == {"john", "jane"}
    series = corpus.get(f"/studies/{corpus.uids['jane']}/series").json()
    assert [s["00080060"]["Value"][0] for s in series] == ["MR", "CT"]
    assert [s["00201209"]["Value"][0] for s in series] == [1, 1]
    nested = corpus.get(f"/studies/{corpus.uids['jane']}/series", Modality="CT").json()
    assert len(nested) == 1
    instances = corpus.get(f"/studies/{corpus.uids['jane']}/instances").json()
    assert sorted(i["00080018"]["Value"][0] for i in instances) == sorted(corpus.instances["jane"])
    assert corpus.keys("/instances", InstanceNumber="2") == {"jane"}
    assert corpus.keys("/instances", Rows="32") == ALL
    base = corpus.server.dicomweb
    for item in instances:
        study, series_uid, sop = (item[t]["Value"][0] for t in ("0020000D", "0020000E", "00080018"))
        assert item["00081190"]["Value"] == [
            f"{base}/studies/{study}/series/{series_uid}/instances/{sop}"]


def test_repeated_uid_keys_are_one_uid_list(corpus: Corpus) -> None:
    # PS3.18 §8.3.4.1: StudyInstanceUID=A&StudyInstanceUID=B is the list A\\B, as
    # dicomweb-client sends search_filters={"StudyInstanceUID": [a, b]}.
    john, anna, jane = corpus.uids["john"], corpus.uids["anna"], corpus.uids["jane"]
    assert corpus.keys("/studies", StudyInstanceUID=[john, anna]) == {"john", "anna"}
    assert corpus.keys("/studies", StudyInstanceUID=[john, "1.2.3.4"]) == {"john"}
    assert corpus.keys("/studies", StudyInstanceUID=[john, f"{anna},{jane}"]) == {
        "john", "anna", "jane"}
    # A keyword and its tag name the same list; a universal value adds nothing to it.
    assert corpus.keys("/studies", StudyInstanceUID=john, **{"0020000D": anna}) == {
        "john", "anna"}
    assert corpus.keys("/studies", StudyInstanceUID=[john, "*"]) == {"john"}
    assert corpus.keys("/studies", StudyInstanceUID=["", ""]) == ALL
    # More UIDs than one value of 1024 characters holds.
    many = [john, *(f"{ROOT}{n}.{'9' * 30}" for n in range(40)), anna]
    assert corpus.keys("/studies", StudyInstanceUID=many) == {"john", "anna"}
    sops = corpus.instances["jane"]
    assert corpus.keys("/instances", SOPInstanceUID=sops) == {"jane"}
    assert len(corpus.get("/instances", SOPInstanceUID=sops).json()) == 2
    # A path UID still narrows the list.
    assert corpus.keys(f"/studies/{jane}/instances", StudyInstanceUID=[john, jane]) == {"jane"}
    assert corpus.keys(f"/studies/{anna}/instances", StudyInstanceUID=[john, jane]) == set()
    assert corpus.get("/studies", StudyInstanceUID=[john, "1.2.abc"]).status_code == 400
    # Other repeated keys must all match, as before.
    assert corpus.keys("/studies", PatientID=["P1", "P2"]) == set()
    assert corpus.keys("/studies", PatientID=["P1", "P*"]) == {"john"}


def test_commas_separate_code_string_lists(corpus: Corpus) -> None:
    # A CS value cannot hold a comma; OHIF (dicomweb-client JS) sends lists comma-joined.
    assert corpus.keys("/studies", ModalitiesInStudy="US,MR") == {"jane", "anna"}
    assert corpus.keys("/studies", ModalitiesInStudy="DX,CR,") == {"quote", "drop"}
    assert corpus.keys("/series", Modality="MR,US") == {"jane", "anna"}
    assert corpus.keys("/series", Modality="MR\\US") == {"jane", "anna"}
    # Other VRs may hold a comma: there it is part of the value.
    assert corpus.keys("/studies", PatientID="P1,P2") == set()


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
def test_commas_in_c_find_code_strings() -> None:
    """C-FIND shares the parser: a backslash list still works, and a comma in a CS
    (invalid there) is read as a separator rather than matching nothing."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.ModalitiesInStudy = ["CT", "MR"]
    identifier.AccessionNumber = "A,1"

    def matches() -> dict[str, Any]:
        query = find_request(identifier, STUDY_ROOT_FIND).query
        return {m.attribute.keyword: (m.type, m.value) for m in query.matches}

    assert matches()["ModalitiesInStudy"] == (MatchType.LIST, ("CT", "MR"))
    assert matches()["AccessionNumber"] == (MatchType.SINGLE, "A,1")
    identifier.ModalitiesInStudy = "CT,MR"
    assert matches()["ModalitiesInStudy"] == (MatchType.LIST, ("CT", "MR"))


def test_instance_availability_is_online(corpus: Corpus) -> None:
    # PS3.18 Tables 10.6.3-3 and 10.6.3-5: present if known; a series result carries
    # its study's attributes (§10.6.3.3.2). C-FIND answers "ONLINE" too.
    jane = corpus.uids["jane"]
    for path in ("/studies", "/series", "/instances", f"/studies/{jane}/series",
                 f"/studies/{jane}/instances"):
        for params in ({}, {"includefield": "all"}):
            items = corpus.get(path, **params).json()
            assert items, path
            assert all(i["00080056"] == {"vr": "CS", "Value": ["ONLINE"]} for i in items), path


# --- includefield -------------------------------------------------------------------------


def _instance(corpus: Corpus, **params: Any) -> dict[str, Any]:
    response = corpus.get(f"/studies/{corpus.uids['john']}/instances", **params)
    assert response.status_code == 200, response.text
    [item] = response.json()
    return dict(item)


def test_includefield(corpus: Corpus) -> None:
    assert "00180050" not in _instance(corpus)
    assert _instance(corpus, includefield="SliceThickness")["00180050"]["Value"] == [2.5]
    assert _instance(corpus, includefield="00180050")["00180050"]["Value"] == [2.5]
    everything = _instance(corpus, includefield="all")
    assert everything["00180050"]["Value"] == [2.5]
    assert everything["00100040"]["Value"] == ["F"]
    assert "7FE00010" not in everything
    both = _instance(corpus, includefield="SliceThickness,PatientSex")
    assert both["00180050"]["Value"] == [2.5] and both["00100040"]["Value"] == ["F"]
    study = corpus.get("/studies", PatientID="P1", includefield="ReferringPhysicianName").json()[0]
    assert study["00080090"]["Value"] == [{"Alphabetic": "House^Gregory"}]
    assert corpus.get("/studies", includefield="NoSuchKeyword").status_code == 400


def test_includefield_all_stays_at_its_level(corpus: Corpus) -> None:
    [study] = corpus.get("/studies", PatientID="P2", includefield="all").json()
    # A study result must not carry one of its series' or instances' identity.
    for tag in ("0020000E", "00080018", "00080060", "00200013"):
        assert tag not in study, tag
    [series] = corpus.get(f"/studies/{corpus.uids['jane']}/series", Modality="MR",
                          includefield="all").json()
    assert "00080018" not in series and "00200013" not in series
    assert series["00080060"]["Value"] == ["MR"]
    # Attributes Lightbox does not index: each only at its own level and below.
    # PatientWeight is the study's (Patient Study module), Manufacturer the
    # series' (General Equipment), SliceThickness and WindowCenter the image's.
    assert study["00101030"]["Value"] == [71.5]
    for tag in ("00080070", "00180050", "00281050"):
        assert tag not in study, tag
    assert series["00101030"]["Value"] == [71.5] and series["00080070"]["Value"] == ["ACME"]
    assert "00180050" not in series and "00281050" not in series
    everything = _instance(corpus, includefield="all")
    assert everything["00080070"]["Value"] == ["ACME"]
    assert everything["00281050"]["Value"] == [40.0]
    # Asked for by name, an attribute comes from the representative instance.
    [named] = corpus.get("/studies", PatientID="P2", includefield="SliceThickness").json()
    assert "00180050" in named


# --- paging, caps and errors ---------------------------------------------------------------


def _study_uids(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [item["0020000D"]["Value"][0] for item in response.json()]


def test_limit_and_offset(corpus: Corpus) -> None:
    everything = _study_uids(corpus.get("/studies"))
    assert sorted(everything) == sorted(corpus.uids.values())
    pages = [corpus.get("/studies", limit=4, offset=o) for o in (0, 4, 8, 12)]
    assert [len(p.json()) for p in pages] == [4, 4, 2, 0]
    assert all("warning" not in p.headers for p in pages)
    assert [u for p in pages for u in _study_uids(p)] == everything
    assert _study_uids(corpus.get("/studies", limit=1000000000)) == everything
    assert _study_uids(corpus.get("/studies", limit=0)) == []


def test_server_cap_warns(capped: Corpus) -> None:
    first = capped.get("/studies")
    assert len(_study_uids(first)) == 4
    assert first.headers["warning"].startswith("299 ")
    huge = capped.get("/studies", limit=1000000000)
    assert _study_uids(huge) == _study_uids(first)
    assert "299" in huge.headers["warning"]
    small = capped.get("/studies", limit=2)
    assert len(_study_uids(small)) == 2 and "warning" not in small.headers
    # Paging past the cap reaches everything.
    seen = [u for o in (0, 4, 8) for u in _study_uids(capped.get("/studies", offset=o))]
    assert sorted(seen) == sorted(capped.uids.values())
    last = capped.get("/studies", offset=8)
    assert len(last.json()) == 2 and "warning" not in last.headers


def test_empty_result_is_200_and_empty_array(corpus: Corpus) -> None:
    for path in ("/studies", "/series", "/instances"):
        response = corpus.get(path, PatientID="nobody")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/dicom+json")
        assert response.json() == []


@pytest.mark.parametrize("key", ["FooBar", "SliceThickness", "NumberOfStudyRelatedSeries",
                                 "00191001", "SOPInstanceUID"])
def test_unsupported_matching_key_is_ignored_with_warning(corpus: Corpus, key: str) -> None:
    response = corpus.get("/studies", **{key: "1"})
    assert response.status_code == 200
    assert key in response.headers["warning"] and response.headers["warning"].startswith("299 ")
    assert len(response.json()) == len(STUDIES)


def test_hostile_keys_and_limits_do_not_break_the_response(corpus: Corpus) -> None:
    # A key with CR/LF, a quote or non-Latin-1 text is echoed in the Warning header
    # only in a form that header can carry.
    for key in ("Foo\r\nX-Injected: 1", 'Foo"Bar', "Foo\u96ea"):
        response = corpus.get("/studies", **{key: "1"})
        assert response.status_code == 200
        assert "x-injected" not in response.headers
        assert response.headers["warning"].startswith('299 lightbox "not supported')
        assert response.headers["warning"].count('"') == 2
        assert len(response.json()) == len(STUDIES)
    # A big limit is clamped, not refused; digits other than 0-9 are refused.
    assert len(corpus.get("/studies", limit="9" * 12).json()) == len(STUDIES)
    assert corpus.get("/studies", limit="\u00b2").status_code == 400
    assert corpus.get("/studies", offset="\u0663").status_code == 400


@pytest.mark.parametrize("params", [
    {"StudyDate": "2024-01-01"},
    {"StudyDate": "202401"},
    {"StudyDate": "20240131-20240101"},
    {"StudyDate": "-"},
    {"StudyDate": "yesterday"},
    {"StudyTime": "noon"},
    {"StudyInstanceUID": "1.2.abc"},
    {"SeriesNumber": "one"},
    # Integers an IS or US cannot hold, which the database's columns cannot either.
    {"SeriesNumber": "9" * 23},
    {"SeriesNumber": "2147483648"},
    {"SeriesNumber": "1_000"},
    {"InstanceNumber": "-2147483649"},
    {"NumberOfFrames": "1" * 65},
    {"Rows": "65536"},
    {"Rows": "-1"},
    # NUL: no DICOM text holds one; PostgreSQL cannot bind one.
    {"PatientID": "\x00"},
    {"PatientName": "A\x00*"},
    {"ModalitiesInStudy": "CT\x00"},
    {"StudyDate": "2024\x000101"},
    {"limit": "-1"},
    {"limit": "ten"},
    {"limit": "1.5"},
    {"offset": "-5"},
    {"offset": "x"},
])
def test_bad_values_are_400(corpus: Corpus, params: dict[str, str]) -> None:
    response = corpus.get(_level_of(params), **params)
    assert response.status_code == 400, (params, response.text)
    assert response.json()["error"]


def _level_of(params: dict[str, str]) -> str:
    levels = {"SeriesNumber": "/series", "InstanceNumber": "/instances",
              "NumberOfFrames": "/instances", "Rows": "/instances"}
    return levels.get(next(iter(params)), "/studies")


@pytest.mark.parametrize("params", [
    {"SeriesNumber": "2147483647"},
    {"SeriesNumber": " -2147483648 "},
    {"InstanceNumber": "+1"},
    {"Rows": "65535"},
    {"Rows": "0"},
])
def test_integers_at_the_ends_of_their_vr_are_matched(
    corpus: Corpus, params: dict[str, str]
) -> None:
    # The same matches as the plain form of the number.
    [(key, value)] = params.items()
    response = corpus.get(_level_of(params), **params)
    assert response.status_code == 200, (params, response.text)
    assert response.json() == corpus.get(_level_of(params), **{key: str(int(value))}).json()


# --- what a caller may see ------------------------------------------------------------------


def test_a_study_scoped_token_finds_only_its_studies(corpus: Corpus) -> None:
    allowed = [corpus.uids["john"], corpus.uids["jane"]]
    token = auth.create_token(corpus.server.archive, studies=allowed, read_only=True)
    with httpx.Client(base_url=corpus.server.dicomweb,
                      headers={"Authorization": f"Bearer {token}"}) as http:
        studies = http.get("/studies", params={"includefield": "all"}).json()
        assert sorted(s["0020000D"]["Value"][0] for s in studies) == sorted(allowed)
        series = http.get("/series", params={"Modality": "CT"}).json()
        assert {s["0020000D"]["Value"][0] for s in series} == set(allowed)
        instances = http.get("/instances").json()
        assert len(instances) == 3
        hidden = corpus.uids["anna"]
        assert http.get(f"/studies/{hidden}/series").json() == []
        assert http.get(f"/studies/{hidden}/instances").json() == []
        assert http.get("/studies", params={"StudyInstanceUID": hidden}).json() == []


def test_patient_level_search_respects_the_scope(corpus: Corpus) -> None:
    archive = corpus.server.archive
    query = Query(level=QueryLevel.PATIENT)
    with archive.db.read() as conn:
        everyone = index_search.search(conn, query, limit=100)
        john = select(studies.c.pk).where(studies.c.study_instance_uid == corpus.uids["john"])
        scoped = index_search.search(conn, query, limit=100, scope_study_pks=john)
    assert len(everyone) == len(STUDIES)
    assert [hit.values["PatientID"] for hit in scoped] == ["P1"]


def test_only_json_is_made(corpus: Corpus) -> None:
    """QIDO-RS and metadata answer in DICOM JSON; a client that accepts only the
    XML form gets 406 rather than a body it did not ask for (PS3.18 8.7.4)."""
    xml = {"Accept": 'multipart/related; type="application/dicom+xml"'}
    study = corpus.uids["john"]
    root = corpus.server.dicomweb
    for path in (f"{root}/studies", f"{root}/studies/{study}/series",
                 f"{root}/studies/{study}/metadata"):
        assert corpus.http.get(path, headers=xml).status_code == 406
        assert corpus.http.get(path, params={"accept": "application/json"},
                               headers=xml).status_code == 200
        for accept in ("application/dicom+json", "application/json", "*/*", ""):
            assert corpus.http.get(path, headers={"Accept": accept}).status_code == 200
