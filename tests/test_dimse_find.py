"""C-FIND against our SCP with DCMTK findscu (responses extracted with -X) at every
level, with wildcard, date-range and UID-list keys; refusals name their reason."""

from __future__ import annotations

import logging
import struct
import warnings
from pathlib import Path

import pydicom
import pynetdicom.association
import pytest
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dsutils import encode

from lightbox.archive import Archive
from lightbox.dicom.attributes import QueryLevel
from lightbox.dicom.query import Query
from lightbox.dimse import contexts
from lightbox.dimse.status import Find
from lightbox.index import search as index_search
from lightbox.services import nodes
from lightbox.services.ingest import Offer, Status, store_instances
from tests.dimse_peers import dcmtk, scp, with_settings
from tests.factories import ROOT, ct_dataset, write

STUDIES = {  # study UID suffix: (patient, name, date, modality, instances)
    "1": ("P1", "SMITH^ANNA", "20240115", "CT", 3),
    "2": ("P1", "SMITH^ANNA", "20240620", "MR", 2),
    "3": ("P2", "JONES^BOB", "20241201", "CT", 1),
}


def _study_uid(key: str) -> str:
    return f"{ROOT}500.{key}"


@pytest.fixture
def loaded(archive: Archive, tmp_path: Path) -> Archive:
    """Three studies of two patients, and FINDSCU registered as a node on loopback."""
    offers = []
    for key, (pid, name, date, modality, count) in STUDIES.items():
        series = f"{ROOT}501.{key}"
        for n in range(1, count + 1):
            ds = ct_dataset(study=_study_uid(key), series=series, sop=f"{ROOT}502.{key}.{n}",
                            patient_id=pid, patient_name=name, instance_number=n,
                            StudyDate=date, Modality=modality)
            offers.append(Offer(write(ds, tmp_path / f"{key}-{n}.dcm"), "test"))
    assert all(o.status is Status.STORED for o in store_instances(archive, offers))
    nodes.add_node(archive, name="finder", ae_title="FINDSCU", host="127.0.0.1", port=1)
    return archive


def _findscu(port: int, model: str, keys: list[str], folder: Path) -> list[Dataset]:
    """Run findscu; its responses, written as files by -X, read back."""
    folder.mkdir()
    argv = ["findscu", model, "-aec", "LIGHTBOX", "-X", "127.0.0.1", str(port)]
    for key in keys:
        argv += ["-k", key]
    dcmtk(*argv, cwd=folder)
    return [pydicom.dcmread(f) for f in sorted(folder.glob("rsp*.dcm"))]


def test_findscu_at_every_level_with_wildcards_ranges_and_lists(
    loaded: Archive, tmp_path: Path
) -> None:
    with scp(loaded) as server:
        patients = _findscu(server.port, "-P", [
            "QueryRetrieveLevel=PATIENT", "PatientName=SMI*", "PatientID", "PatientBirthDate",
        ], tmp_path / "patients")
        studies = _findscu(server.port, "-S", [
            "QueryRetrieveLevel=STUDY", "StudyDate=20240101-20240630", "PatientName",
            "StudyInstanceUID", "ModalitiesInStudy", "NumberOfStudyRelatedInstances",
            "RetrieveAETitle",
        ], tmp_path / "studies")
        series = _findscu(server.port, "-S", [
            "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={_study_uid('1')}",
            "SeriesInstanceUID", "Modality", "NumberOfSeriesRelatedInstances",
        ], tmp_path / "series")
        images = _findscu(server.port, "-S", [
            "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={_study_uid('1')}",
            f"SOPInstanceUID={ROOT}502.1.1\\{ROOT}502.1.3", "SOPClassUID", "InstanceNumber",
        ], tmp_path / "images")
        open_ended = _findscu(server.port, "-S", [
            "QueryRetrieveLevel=STUDY", "StudyDate=20240601-", "PatientName=*ones*",
            "StudyInstanceUID",
        ], tmp_path / "open")

    assert [(p.PatientID, str(p.PatientName)) for p in patients] == [("P1", "SMITH^ANNA")]
    assert "PatientBirthDate" in patients[0]  # asked for: returned, here with its value
    assert {s.StudyInstanceUID: (s.ModalitiesInStudy, int(s.NumberOfStudyRelatedInstances))
            for s in studies} == {_study_uid("1"): ("CT", 3), _study_uid("2"): ("MR", 2)}
    assert all(s.RetrieveAETitle == "LIGHTBOX" and s.QueryRetrieveLevel == "STUDY"
               for s in studies)
    # The keys asked for are the keys returned (no more, apart from the character set).
    asked = {"QueryRetrieveLevel", "StudyDate", "PatientName", "StudyInstanceUID",
             "ModalitiesInStudy", "NumberOfStudyRelatedInstances", "RetrieveAETitle"}
    assert {e.keyword for e in studies[0]} - {"SpecificCharacterSet"} == asked
    assert [(s.Modality, int(s.NumberOfSeriesRelatedInstances)) for s in series] == [("CT", 3)]
    assert sorted(int(i.InstanceNumber) for i in images) == [1, 3]
    assert {i.SOPClassUID for i in images} == {"1.2.840.10008.5.1.4.1.1.2"}
    # Person names match case-insensitively; an open date range has one bound.
    assert [s.StudyInstanceUID for s in open_ended] == [_study_uid("3")]


def test_unknown_caller_cannot_query(archive: Archive, tmp_path: Path) -> None:
    with scp(archive) as server:
        done = dcmtk("findscu", "-S", "-aec", "LIGHTBOX", "-k", "QueryRetrieveLevel=STUDY",
                     "127.0.0.1", str(server.port), check=False)
    assert done.returncode != 0
    assert "No Acceptable Presentation Contexts" in done.stdout + done.stderr


def _find(port: int, model: str, identifier: Dataset) -> list[tuple[int, str]]:
    ae = AE(ae_title="FINDSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", port, ae_title="LIGHTBOX")
    assert assoc.is_established
    try:
        return [(int(status.Status), str(status.get("ErrorComment", "")))
                for status, _ in assoc.send_c_find(identifier, model)]
    finally:
        assoc.release()


def test_bad_identifiers_get_a_failure_status_with_a_reason(loaded: Archive) -> None:
    patient_level = Dataset()
    patient_level.QueryRetrieveLevel = "PATIENT"
    patient_level.PatientID = ""
    bad_range = Dataset()
    bad_range.QueryRetrieveLevel = "STUDY"
    with warnings.catch_warnings():  # pydicom warns about the invalid date, as it should
        warnings.simplefilter("ignore")
        bad_range.StudyDate = "2024-01"
    no_level = Dataset()
    no_level.PatientID = "P1"
    with scp(loaded) as server:
        answers = [
            _find(server.port, contexts.STUDY_ROOT_FIND, patient_level),
            _find(server.port, contexts.STUDY_ROOT_FIND, bad_range),
            _find(server.port, contexts.PATIENT_ROOT_FIND, no_level),
        ]
    for answer in answers:
        assert len(answer) == 1
        status, comment = answer[0]
        assert status == Find.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
        assert comment
    assert "PATIENT" in answers[0][0][1]
    assert "StudyDate" in answers[1][0][1]


def test_a_key_nothing_matches_on_makes_every_match_a_warning(loaded: Archive) -> None:
    """PS3.4 C.4.1.1.4: FF01 when optional keys were not supported for matching
    (InstitutionName is not indexed; Modality is a series key, not a study key).
    Return keys without a value, and universal matches, are supported."""
    def identifier(**keys: str) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.PatientID = "P1"
        for keyword, value in keys.items():
            setattr(ds, keyword, value)
        return ds

    with scp(loaded) as server:
        unmatched = _find(server.port, contexts.STUDY_ROOT_FIND,
                          identifier(InstitutionName="NOWHERE"))
        elsewhere = _find(server.port, contexts.STUDY_ROOT_FIND, identifier(Modality="CT"))
        returned = _find(server.port, contexts.STUDY_ROOT_FIND,
                         identifier(InstitutionName="", StudyDescription="*"))
    for answer in (unmatched, elsewhere):
        assert [s for s, _ in answer] == [Find.PENDING_WARNING] * 2 + [Find.SUCCESS]
    assert [s for s, _ in returned] == [Find.PENDING] * 2 + [Find.SUCCESS]


def test_more_matches_than_the_cap_end_in_a_refusal_not_success(loaded: Archive) -> None:
    """Success says every match was sent: when dicom_find_max_results cuts the
    answer short, the final status is Out of Resources, with the reason."""
    every_instance = Dataset()
    every_instance.QueryRetrieveLevel = "IMAGE"
    every_instance.StudyInstanceUID = _study_uid("1")
    every_instance.SOPInstanceUID = ""
    with scp(with_settings(loaded, dicom_find_max_results=2, qido_max_results=1)) as server:
        cut = _find(server.port, contexts.STUDY_ROOT_FIND, every_instance)
    with scp(with_settings(loaded, dicom_find_max_results=3, qido_max_results=1)) as server:
        exact = _find(server.port, contexts.STUDY_ROOT_FIND, every_instance)
    assert [s for s, _ in cut] == [Find.PENDING] * 2 + [Find.OUT_OF_RESOURCES]
    assert "narrow the query" in cut[-1][1]
    assert [s for s, _ in exact] == [Find.PENDING] * 3 + [Find.SUCCESS]


def test_unknown_required_keys_match_any_value_in_c_find_only(
    loaded: Archive, tmp_path: Path
) -> None:
    """PS3.4 C.2.2.1.2: an entity whose Required Key is empty matches any value of
    that key in C-FIND. PatientID is the Unique Key of the Patient Root model's
    patients, so there it must match exactly. QIDO-RS keeps to the values."""
    unknown = {  # study UID suffix: (patient ID, attributes left empty)
        "4": ("P4", {"StudyDate": "", "AccessionNumber": ""}),
        "5": ("", {"StudyDate": "20230301", "SeriesNumber": None}),
    }
    offers = []
    for key, (pid, empty) in unknown.items():
        ds = ct_dataset(study=_study_uid(key), series=f"{ROOT}501.{key}",
                        sop=f"{ROOT}502.{key}.1", patient_id=pid, patient_name="DOE^JO")
        for keyword, value in empty.items():
            setattr(ds, keyword, value)
        offers.append(Offer(write(ds, tmp_path / f"{key}.dcm"), "test"))
    assert all(o.status is Status.STORED for o in store_instances(loaded, offers))

    def studies(model: str, *keys: str) -> set[str]:
        folder = tmp_path / f"q{len(list(tmp_path.glob('q*')))}"
        found = _findscu(server.port, model, ["QueryRetrieveLevel=STUDY", "StudyInstanceUID",
                                              *keys], folder)
        return {str(ds.StudyInstanceUID).rsplit(".", 1)[1] for ds in found}

    with scp(loaded) as server:
        # The undated study is in every date range; the study without an accession
        # number is found by any accession number.
        assert studies("-S", "StudyDate=20240101-20240630") == {"1", "2", "4"}
        assert studies("-S", "AccessionNumber=NONE-SUCH") == {"4"}
        # In the Study Root model PatientID is a Required Key ...
        assert studies("-S", "PatientID=P1") == {"1", "2", "5"}
        # ... in the Patient Root model, the patient's Unique Key.
        assert studies("-P", "PatientID=P1") == {"1", "2"}
        patients = _findscu(server.port, "-P", ["QueryRetrieveLevel=PATIENT", "PatientID=P1"],
                            tmp_path / "patients")
        assert [p.PatientID for p in patients] == ["P1"]
        # Series without a number match any SeriesNumber; those with one, only theirs.
        series = _findscu(server.port, "-S", [
            "QueryRetrieveLevel=SERIES", "SeriesNumber=7", "SeriesInstanceUID",
        ], tmp_path / "series")
        assert [s.SeriesInstanceUID for s in series] == [f"{ROOT}501.5"]

    # QIDO-RS's query (the same search, without unknown_matches) keeps to the values.
    query = Query(level=QueryLevel.STUDY)
    query.add("StudyDate", "20240101-20240630")
    with loaded.db.read() as conn:
        hits = index_search.search(conn, query, limit=100)
    assert {hit.values["StudyInstanceUID"].rsplit(".", 1)[1] for hit in hits} == {"1", "2"}


def _with_vr(identifier: Dataset, keyword: str, vr: bytes) -> bytes:
    """``identifier`` in Explicit VR Little Endian, ``keyword``'s VR replaced by ``vr``."""
    encoded = encode(identifier, False, True)
    assert encoded is not None
    raw = bytearray(encoded)
    tag = Tag(keyword)
    at = raw.index(struct.pack("<HH", tag.group, tag.elem))
    raw[at + 4:at + 6] = vr
    return bytes(raw)


# A StudyInstanceUID whose VR is no VR (pydicom refuses it only when it is first
# looked at: for C-GET and C-MOVE that was after the level, and it became an
# internal error); a sequence of undefined length that never ends (the bytes
# are no dataset at all).
UNREADABLE = {
    "a VR that is none": (lambda ds: _with_vr(ds, "StudyInstanceUID", b"Uj"),
                          "Unknown Value Representation"),
    "an endless sequence": (lambda ds: _with_vr(ds, "StudyInstanceUID", b"UI")
                            + b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff", "No tag to read"),
}


@pytest.mark.parametrize("case", sorted(UNREADABLE))
@pytest.mark.parametrize("model", [contexts.STUDY_ROOT_FIND, contexts.STUDY_ROOT_GET])
def test_an_identifier_that_cannot_be_read_is_the_peers_error(
    loaded: Archive, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    model: str, case: str,
) -> None:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = _study_uid("1")
    make, reason = UNREADABLE[case]
    raw = make(identifier)
    monkeypatch.setattr(pynetdicom.association, "encode", lambda *args, **kwargs: raw)
    ae = AE(ae_title="FINDSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(model, ExplicitVRLittleEndian)
    with caplog.at_level(logging.WARNING), scp(loaded) as server:
        assoc = ae.associate("127.0.0.1", server.port, ae_title="LIGHTBOX")
        assert assoc.is_established
        try:
            send = assoc.send_c_find if model == contexts.STUDY_ROOT_FIND else assoc.send_c_get
            answers = [status for status, _ in send(identifier, model)]
        finally:
            assoc.release()
    assert int(answers[-1].Status) == Find.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    assert answers[-1].ErrorComment.startswith("unreadable identifier: ")
    assert reason in answers[-1].ErrorComment
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
def test_matches_reach_the_peer_in_its_transfer_syntax_and_pdu_size(
    loaded: Archive, tmp_path: Path, syntax: str
) -> None:
    """Matches are encoded by hand (``dimse.matches``, ``dimse.responses``) in
    either syntax the SCP accepts for queries; the peer reads the same answers,
    here through a 128-byte maximum PDU that splits every response, with a
    name beyond ASCII sent in UTF-8 and an empty sequence asked for."""
    umlaut = ct_dataset(study=_study_uid("4"), patient_id="P3", patient_name="MÜLLER^JÖRG",
                        SpecificCharacterSet="ISO_IR 192", Modality="MR")
    assert store_instances(loaded, [Offer(write(umlaut, tmp_path / "u.dcm"), "test")])[0].status \
        is Status.STORED
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "ModalitiesInStudy",
                    "NumberOfStudyRelatedInstances", "StudyDate"):
        setattr(identifier, keyword, "")
    identifier.ReferencedStudySequence = []
    ae = AE(ae_title="FINDSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.maximum_pdu_size = 128
    ae.add_requested_context(contexts.STUDY_ROOT_FIND, syntax)
    with scp(loaded) as server:
        assoc = ae.associate("127.0.0.1", server.port, ae_title="LIGHTBOX")
        assert assoc.is_established
        try:
            answers = list(assoc.send_c_find(identifier, contexts.STUDY_ROOT_FIND))
        finally:
            assoc.release()
    assert [int(status.Status) for status, _ in answers] == [Find.PENDING] * 4 + [Find.SUCCESS]
    found = {str(m.StudyInstanceUID): m for _, m in answers[:-1]}
    assert {uid: (str(m.PatientName), m.PatientID, m.ModalitiesInStudy,
                  int(m.NumberOfStudyRelatedInstances), m.StudyDate, len(m.ReferencedStudySequence))
            for uid, m in found.items()} == {
        _study_uid("1"): ("SMITH^ANNA", "P1", "CT", 3, "20240115", 0),
        _study_uid("2"): ("SMITH^ANNA", "P1", "MR", 2, "20240620", 0),
        _study_uid("3"): ("JONES^BOB", "P2", "CT", 1, "20241201", 0),
        _study_uid("4"): ("MÜLLER^JÖRG", "P3", "MR", 1, "20240301", 0),
    }
    assert found[_study_uid("4")].SpecificCharacterSet == "ISO_IR 192"
    assert "SpecificCharacterSet" not in found[_study_uid("1")]
    assert all(m.QueryRetrieveLevel == "STUDY" for m in found.values())
