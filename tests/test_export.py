"""Study download as a ZIP with a DICOMDIR, on both backends."""

from __future__ import annotations

import io
import subprocess
import tracemalloc
import zipfile
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.fileset import FileSet
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from lightbox.services import auth
from tests.conftest import RunningServer
from tests.factories import ROOT, ct_dataset, stow_body, to_bytes


def _store(server: RunningServer, parts: list[bytes]) -> None:
    body, content_type = stow_body(parts)
    answer = httpx.post(
        server.dicomweb + "/studies", content=body,
        headers={**server.headers, "Content-Type": content_type}, timeout=60,
    )
    assert answer.status_code == 200, answer.text


def _study(n_series: int = 2, per_series: int = 3, **extra: object) -> tuple[str, list[bytes]]:
    study = generate_uid(prefix=ROOT)
    parts = []
    for s in range(n_series):
        series = generate_uid(prefix=ROOT)
        for i in range(per_series):
            ds = ct_dataset(study=study, series=series, instance_number=i + 1,
                            SeriesNumber=s + 1, **extra)
            if s == 1 and i == 0:
                # Stored as sent: the export must not convert it.
                ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
            parts.append(to_bytes(ds))
    return study, parts


def _read_fileset(archive: zipfile.ZipFile, out: Path) -> FileSet:
    archive.extractall(out)
    return FileSet(dcmread(out / "DICOMDIR"))


def test_download_holds_identical_files_and_a_valid_dicomdir(
    server: RunningServer, tmp_path: Path
) -> None:
    study, parts = _study()
    _store(server, parts)
    answer = httpx.get(f"{server.url}/download/studies/{study}.zip", headers=server.headers)
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/zip"
    assert answer.headers["content-disposition"] == f'attachment; filename="study-{study}.zip"'
    with zipfile.ZipFile(io.BytesIO(answer.content)) as zf:
        assert zf.testzip() is None
        names = zf.namelist()
        members = {n: zf.read(n) for n in names if n != "DICOMDIR"}
        fileset = _read_fileset(zf, tmp_path / "out")
    assert "DICOMDIR" in names
    assert sorted(members.values()) == sorted(parts)  # byte-identical, syntax as stored
    for name in members:
        assert all(len(c) <= 8 and c == c.upper() for c in name.split("/"))
    assert fileset.ID == "LIGHTBOX"
    assert len(fileset) == len(parts)
    by_sop = {dcmread(io.BytesIO(p)).SOPInstanceUID: p for p in parts}
    for instance in fileset:
        assert instance.path.startswith(str(tmp_path / "out"))
        assert Path(instance.path).read_bytes() == by_sop[instance.SOPInstanceUID]
        assert instance.StudyInstanceUID == study
    patients = fileset.find_values("PatientID")
    assert patients == ["PAT-1"]
    assert len(fileset.find_values("SeriesInstanceUID")) == 2


def test_dicomdir_records_carry_the_required_keys(server: RunningServer) -> None:
    study, parts = _study(n_series=1, per_series=2)
    _store(server, parts)
    answer = httpx.get(f"{server.url}/download/studies/{study}.zip", headers=server.headers)
    with zipfile.ZipFile(io.BytesIO(answer.content)) as zf:
        dicomdir = dcmread(io.BytesIO(zf.read("DICOMDIR")))
        names = set(zf.namelist())
    assert dicomdir.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.1.3.10"
    records = dicomdir.DirectoryRecordSequence
    kinds = [r.DirectoryRecordType for r in records]
    assert kinds == ["PATIENT", "STUDY", "SERIES", "IMAGE", "IMAGE"]
    patient, study_rec, series_rec, image = records[0], records[1], records[2], records[3]
    assert patient.PatientID == "PAT-1" and str(patient.PatientName) == "Test^Patient"
    for key in ("StudyDate", "StudyTime", "StudyID", "StudyInstanceUID"):
        assert study_rec.get(key), key
    assert series_rec.Modality == "CT" and series_rec.SeriesNumber == 1
    assert "/".join(image.ReferencedFileID) in names
    assert image.ReferencedTransferSyntaxUIDInFile == "1.2.840.10008.1.2.1"
    first = dicomdir.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity
    assert first == records[0].seq_item_tell
    assert patient.OffsetOfReferencedLowerLevelDirectoryEntity == study_rec.seq_item_tell
    assert image.OffsetOfTheNextDirectoryRecord == records[4].seq_item_tell
    assert records[4].OffsetOfTheNextDirectoryRecord == 0


def test_download_of_unknown_or_unauthorised_study_is_404(server: RunningServer) -> None:
    study, parts = _study(n_series=1, per_series=1)
    _store(server, parts)
    other = auth.create_token(server.archive, studies=[generate_uid(prefix=ROOT)])
    url = f"{server.url}/download/studies/{study}.zip"
    assert httpx.get(url, headers={"Authorization": f"Bearer {other}"}).status_code == 404
    missing = f"{server.url}/download/studies/{generate_uid(prefix=ROOT)}.zip"
    assert httpx.get(missing, headers=server.headers).status_code == 404
    assert httpx.get(url, headers={"Authorization": "Bearer nope"}).status_code == 401
    page = httpx.get(url)
    assert page.status_code == 303 and page.headers["location"].startswith("/login")


def test_download_memory_stays_flat_for_a_larger_study(
    server: RunningServer, tmp_path: Path
) -> None:
    study = generate_uid(prefix=ROOT)
    series = generate_uid(prefix=ROOT)
    total = 0
    for batch in range(4):
        parts = [
            to_bytes(ct_dataset(study=study, series=series, size=512,
                                instance_number=batch * 20 + i + 1))
            for i in range(20)
        ]
        total += sum(len(p) for p in parts)
        _store(server, parts)
    target = tmp_path / "study.zip"
    tracemalloc.start()
    try:
        with httpx.stream("GET", f"{server.url}/download/studies/{study}.zip",
                          headers=server.headers, timeout=60) as answer, target.open("wb") as out:
            assert answer.status_code == 200
            for chunk in answer.iter_bytes():
                out.write(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total > 40_000_000
    assert peak < total / 4, (peak, total)
    with zipfile.ZipFile(target) as zf:
        assert len(zf.namelist()) == 81
        assert zf.testzip() is None


def test_key_object_gets_a_key_object_record(server: RunningServer, tmp_path: Path) -> None:
    ds = ct_dataset()
    _store(server, [to_bytes(ds)])
    marked = httpx.post(server.url + "/key-images", headers=server.headers, data={
        "study": ds.StudyInstanceUID, "series": ds.SeriesInstanceUID, "sop": ds.SOPInstanceUID})
    assert marked.status_code == 303
    answer = httpx.get(f"{server.url}/download/studies/{ds.StudyInstanceUID}.zip",
                       headers=server.headers)
    with zipfile.ZipFile(io.BytesIO(answer.content)) as zf:
        fileset = _read_fileset(zf, tmp_path / "out")
    kinds = sorted(i.DirectoryRecordType for i in fileset)
    assert kinds == ["IMAGE", "KEY OBJECT DOC"]
    ko = next(i for i in fileset if i.DirectoryRecordType == "KEY OBJECT DOC")
    assert ko.load().Modality == "KO"
    assert ko.ConceptNameCodeSequence[0].CodeValue == "113000"


def test_zip64_records_when_sizes_need_them(
    server: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large studies get ZIP64 records; shown with a lowered limit, not 4 GiB of data."""
    study, parts = _study(n_series=1, per_series=3)
    _store(server, parts)
    with monkeypatch.context() as patched:
        patched.setattr(zipfile, "ZIP64_LIMIT", 1000)
        answer = httpx.get(f"{server.url}/download/studies/{study}.zip", headers=server.headers)
    assert answer.status_code == 200
    target = tmp_path / "study.zip"
    target.write_bytes(answer.content)
    with zipfile.ZipFile(target) as zf:
        assert zf.testzip() is None
        assert sorted(zf.read(n) for n in zf.namelist() if n != "DICOMDIR") == sorted(parts)
    assert b"PK\x06\x06" in answer.content  # the ZIP64 end of central directory record
    # A second reader, Info-ZIP's (installed by `make test`).
    tested = subprocess.run(["unzip", "-t", str(target)], capture_output=True, text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr
