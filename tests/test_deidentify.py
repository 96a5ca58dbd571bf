"""De-identified share links on both backends: what dicomweb-client gets back
carries no PHI of the original (PS3.15 Basic Profile), pixel data unchanged,
UIDs consistent within the link, burned-in images withheld."""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import httpx
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import generate_uid

from lightbox.services import deidentify, sharing
from lightbox.services.auth import Principal
from tests.conftest import RunningServer
from tests.factories import ROOT, ct_dataset, stow_body, to_bytes

PHI: dict[str, Any] = {
    "PatientName": "Doe^Jane", "PatientID": "MRN-778899", "PatientBirthDate": "19710203",
    "AccessionNumber": "ACC-445566", "InstitutionName": "Saint Elsewhere Hospital",
    "ReferringPhysicianName": "House^Gregory", "OperatorsName": "Tech^Tina",
    "StationName": "CTSTATION9", "DeviceSerialNumber": "SN-123987", "StudyID": "STUDY-9911",
    "OtherPatientIDs": "ALT-5544", "PatientAge": "053Y", "InstitutionAddress": "1 Main Street",
    "StudyDescription": "Chest for Jane", "SeriesDescription": "Axial Jane",
    "ImageComments": "Jane looked nervous", "StudyDate": "20240301", "StudyTime": "101500",
    "PerformingPhysicianName": "Surgeon^Sam", "ProtocolName": "Jane protocol",
}
PRIVATE_TEXT = "Private note about Jane Doe"


def _study() -> tuple[str, list[Dataset]]:
    """Two series sharing a Frame of Reference, references between instances,
    private tags, PHI in sequences, and one instance with burned-in text."""
    study, frame_of_reference = str(generate_uid(prefix=ROOT)), generate_uid(prefix=ROOT)
    datasets: list[Dataset] = []
    for s in range(2):
        series = generate_uid(prefix=ROOT)
        for i in range(3):
            ds = ct_dataset(study=study, series=series, instance_number=i + 1,
                            SeriesNumber=s + 1, FrameOfReferenceUID=frame_of_reference,
                            patient_name=PHI["PatientName"], patient_id=PHI["PatientID"],
                            **{k: v for k, v in PHI.items() if not k.startswith("PatientN")
                               and k != "PatientID"})
            ds.BurnedInAnnotation = "YES" if (s, i) == (1, 2) else "NO"
            block = ds.private_block(0x0009, "ACME IMAGING", create=True)
            block.add_new(0x01, "LO", PRIVATE_TEXT)
            request = Dataset()
            request.RequestedProcedureID = "REQ-JANE-1"
            ds.RequestAttributesSequence = [request]
            if datasets:
                ref = Dataset()
                ref.ReferencedSOPClassUID = datasets[0].SOPClassUID
                ref.ReferencedSOPInstanceUID = datasets[0].SOPInstanceUID
                ref.add_new(0x00091010, "LO", PRIVATE_TEXT)  # private, inside a sequence
                ds.ReferencedImageSequence = [ref]
            datasets.append(ds)
    return study, datasets


def _shared(server: RunningServer) -> tuple[str, list[Dataset], str, sharing.ShareLink]:
    study, datasets = _study()
    body, content_type = stow_body([to_bytes(ds) for ds in datasets])
    stored = httpx.post(server.dicomweb + "/studies", content=body, timeout=60,
                        headers={**server.headers, "Content-Type": content_type})
    assert stored.status_code == 200, stored.text
    made = sharing.create_share(server.archive, Principal("admin", True), study=study,
                                deidentify=True)
    return study, datasets, f"{server.url}/s/{made.token}", made.link


def _secrets(datasets: list[Dataset]) -> set[str]:
    """Every identifying value of the originals: PHI, private text, instance UIDs."""
    values = {v for v in PHI.values()} | {PRIVATE_TEXT, "REQ-JANE-1", "Jane", "Doe"}
    for ds in datasets:
        values |= {str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                   str(ds.SOPInstanceUID), str(ds.FrameOfReferenceUID)}
    return values


def _header_bytes(ds: Dataset) -> bytes:
    """The encoded elements before Pixel Data (pixel bytes could match by chance)."""
    copy = Dataset({e.tag: e for e in ds if e.tag != 0x7FE00010})
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_dataset(out, copy)
    return bytes(out.getvalue())


def _check_against_profile(ds: Dataset, originals: dict[int, Any]) -> None:
    """Every element, at every depth, obeys the Basic Profile table."""
    for elem in ds.iterall():
        tag = int(elem.tag)
        assert not elem.tag.is_private, f"private {elem.tag} kept"
        written = deidentify.BASIC_PROFILE.get(tag)
        if written is None:
            continue
        assert written != "X", f"{elem.keyword} should be removed"
        if written in ("Z", "X/Z", "Z/D", "X/Z/D") and elem.VR != "SQ":
            assert elem.value in (None, "", b"", []), f"{elem.keyword} should be empty"
        if written in ("D", "X/D") and tag in originals:
            assert elem.value != originals[tag], f"{elem.keyword} kept its value"
        if written == "U" and elem.value:
            assert str(elem.value).startswith("2.25."), elem.keyword


def test_deidentified_share_leaks_no_phi(server: RunningServer) -> None:
    study, datasets, url, _link = _shared(server)
    client = DICOMwebClient(url=url + "/dicom-web")
    secrets = _secrets(datasets)
    found = client.search_for_studies()
    assert len(found) == 1
    public_study = found[0]["0020000D"]["Value"][0]
    assert public_study != study and public_study.startswith("2.25.")
    search_text = json.dumps([found, client.search_for_series(public_study),
                              client.search_for_instances(public_study)])
    assert not [s for s in secrets if s in search_text]
    metadata = client.retrieve_study_metadata(public_study)
    metadata_text = json.dumps(metadata)
    assert not [s for s in secrets if s in metadata_text]
    assert all(m["00120062"]["Value"] == ["YES"] for m in metadata)
    retrieved = client.retrieve_study(public_study)
    assert len(retrieved) == len(datasets) - 1  # the burned-in one is withheld
    by_position = {(int(d.SeriesNumber), int(d.InstanceNumber)): d for d in datasets}
    for ds in retrieved:
        original = by_position[(int(ds.SeriesNumber), int(ds.InstanceNumber))]
        _check_against_profile(ds, {int(e.tag): e.value for e in original})
        header = _header_bytes(ds)
        leaked = [s for s in secrets if s.encode() in header]
        assert not leaked, leaked
        assert ds.PixelData == original.PixelData
        assert ds.PatientIdentityRemoved == "YES"
        code = ds.DeidentificationMethodCodeSequence[0]
        assert (code.CodeValue, code.CodingSchemeDesignator) == ("113100", "DCM")
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.BurnedInAnnotation == "NO"
        assert "RequestAttributesSequence" not in ds


def test_deidentified_uids_are_consistent_and_usable(server: RunningServer) -> None:
    study, datasets, url, _link = _shared(server)
    root = url + "/dicom-web"
    client = DICOMwebClient(url=root)
    public_study = client.search_for_studies()[0]["0020000D"]["Value"][0]
    retrieved = client.retrieve_study(public_study)
    assert {ds.StudyInstanceUID for ds in retrieved} == {public_study}
    assert len({ds.FrameOfReferenceUID for ds in retrieved}) == 1
    assert retrieved[0].FrameOfReferenceUID != datasets[0].FrameOfReferenceUID
    series_of = {(int(d.SeriesNumber)): d.SeriesInstanceUID for d in retrieved}
    assert len(set(series_of.values())) == 2
    sops = {ds.SOPInstanceUID for ds in retrieved}
    first = next(d for d in retrieved if int(d.SeriesNumber) == 1 and int(d.InstanceNumber) == 1)
    for ds in retrieved:
        if "ReferencedImageSequence" in ds:
            assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
            assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID in sops
    # A second retrieval maps the same way; a URL made of public UIDs works.
    again = client.retrieve_series(public_study, first.SeriesInstanceUID)
    assert first.SOPInstanceUID in {d.SOPInstanceUID for d in again}
    frames = client.retrieve_instance_frames(public_study, first.SeriesInstanceUID,
                                             first.SOPInstanceUID, frame_numbers=[1])
    assert frames[0] == first.PixelData
    path = f"/studies/{public_study}/series/{first.SeriesInstanceUID}"
    assert httpx.get(root + path + "/thumbnail").headers["content-type"] == "image/jpeg"
    instance_path = f"{path}/instances/{first.SOPInstanceUID}"
    meta = httpx.get(root + instance_path + "/metadata").json()[0]
    bulk = meta["7FE00010"]["BulkDataURI"]
    assert bulk == root + instance_path + "/bulkdata/7FE00010"
    pixels = httpx.get(bulk, headers={"Accept": "application/octet-stream"})
    assert pixels.status_code == 200 and pixels.content == first.PixelData
    # Original UIDs mean nothing under the link, and neither do identifying searches.
    original = datasets[0]
    for wrong in (f"/studies/{study}/metadata",
                  f"/studies/{public_study}/series/{original.SeriesInstanceUID}/metadata"):
        assert httpx.get(root + wrong).status_code == 404
    assert httpx.get(root + "/studies?PatientName=Doe*").status_code == 400
    assert httpx.get(root + f"/studies?StudyInstanceUID={public_study}").json()


def test_burned_in_instance_is_withheld_everywhere(server: RunningServer) -> None:
    _study_uid, datasets, url, link = _shared(server)
    burned = next(d for d in datasets if d.BurnedInAnnotation == "YES")
    public = {k: link.public_uid(str(getattr(burned, k)))
              for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
    path = (f"{url}/dicom-web/studies/{public['StudyInstanceUID']}/series/"
            f"{public['SeriesInstanceUID']}/instances/{public['SOPInstanceUID']}")
    for suffix in ("", "/metadata", "/frames/1", "/rendered", "/bulkdata/7FE00010"):
        answer = httpx.get(path + suffix, headers={"Accept": "*/*"})
        assert answer.status_code == 404, suffix
    listed = httpx.get(f"{url}/dicom-web/studies/{public['StudyInstanceUID']}/instances").json()
    assert public["SOPInstanceUID"] not in json.dumps(listed)
    assert len(listed) == len(datasets) - 1
    page = httpx.get(url)
    assert page.status_code == 200
    assert "1 image was withheld" in page.text
    assert not [s for s in _secrets(datasets) if s in page.text]
    # The ZIP: the same de-identified files (the burned-in one left out), a DICOMDIR
    # of public UIDs, and not one identifying value in any of its bytes.
    answer = httpx.get(url + "/download.zip")
    assert answer.status_code == 200
    files = zipfile.ZipFile(io.BytesIO(answer.content))
    names = files.namelist()
    assert "DICOMDIR" in names and len(names) == len(datasets)
    for name in names:
        data = files.read(name)
        parsed = dcmread(io.BytesIO(data), stop_before_pixels=True)
        leaked = [s for s in _secrets(datasets) if s.encode() in _header_bytes(parsed)]
        assert not leaked, (name, leaked)
        if name != "DICOMDIR":
            assert parsed.StudyInstanceUID == public["StudyInstanceUID"]
            assert parsed.SOPInstanceUID != public["SOPInstanceUID"]
    directory = dcmread(io.BytesIO(files.read("DICOMDIR")))
    studies = [r for r in directory.DirectoryRecordSequence if r.DirectoryRecordType == "STUDY"]
    assert [r.StudyInstanceUID for r in studies] == [public["StudyInstanceUID"]]


def test_profile_table_covers_the_usual_suspects() -> None:
    from pydicom.datadict import tag_for_keyword

    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber",
                    "InstitutionName", "ReferringPhysicianName", "StudyInstanceUID",
                    "SOPInstanceUID", "FrameOfReferenceUID", "OtherPatientIDs", "StudyDate"):
        assert tag_for_keyword(keyword) in deidentify.BASIC_PROFILE, keyword
    mapper = deidentify.UidMapper("secret")
    uid = "1.2.3.4.5"
    assert mapper.public(uid) == mapper.public(uid) != deidentify.UidMapper("other").public(uid)
    assert len(mapper.public(uid)) <= 44
    assert mapper.public("1.2.840.10008.1.2.1") == "1.2.840.10008.1.2.1"
