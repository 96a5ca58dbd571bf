"""Lightbox as SCU against Orthanc as SCP, through the CLI: echo, find, move into
Lightbox (through our SCP), get (through the ingest path), send; and Orthanc
C-MOVE-ing a study out of Lightbox to itself."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from lightbox.archive import Archive
from lightbox.cli.main import main
from lightbox.index.schema import instances
from lightbox.services.ingest import Offer, Status, store_instances
from tests.conftest import free_port
from tests.dimse_peers import Orthanc, dcmtk, make_corpus, orthanc, scp
from tests.factories import ROOT, ct_dataset, write

LOCAL_STUDY = ROOT + "600"


@dataclass
class Peer:
    orthanc: Orthanc
    lightbox_port: int  # where Orthanc expects Lightbox's SCP
    studies: dict[str, tuple[str, set[str]]]  # name: (Study Instance UID, SOP Instance UIDs)


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    """Orthanc knowing Lightbox as a modality, holding two studies sent by storescu."""
    work = tmp_path_factory.mktemp("orthanc")
    lightbox_port = free_port()
    with orthanc(work, {"lightbox": ("LIGHTBOX", lightbox_port)}) as running:
        studies = {}
        for name, seed, syntax in (("moved", "51", "explicit"), ("got", "52", "jpeg2000")):
            files = make_corpus(work / name, "--slices", "3", "--size", "64", "--seed", seed,
                                "--syntax", syntax)
            dcmtk("storescu", "-aec", running.aet, "-xv", "127.0.0.1", str(running.dicom_port),
                  *map(str, files))
            first = pydicom.dcmread(files[0], stop_before_pixels=True)
            studies[name] = (str(first.StudyInstanceUID),
                             {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                              for f in files})
        yield Peer(running, lightbox_port, studies)


def _cli(archive: Archive, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    settings = archive.settings
    code = main([*argv, "--data", str(settings.data), "--database", settings.database_url])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    return out.out


def _stored(archive: Archive) -> set[str]:
    with archive.db.read() as conn:
        return set(conn.execute(select(instances.c.sop_instance_uid)).scalars())


def test_lightbox_as_scu_against_orthanc(
    archive: Archive, peer: Peer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    local = [write(ct_dataset(instance_number=n, study=LOCAL_STUDY), tmp_path / f"{n}.dcm")
             for n in (1, 2)]
    assert all(o.status is Status.STORED
               for o in store_instances(archive, [Offer(p, "test") for p in local]))
    moved_uid, moved_sops = peer.studies["moved"]
    got_uid, got_sops = peer.studies["got"]
    port = str(peer.orthanc.dicom_port)

    _cli(archive, capsys, "node", "add", "orthanc", "--aet", "ORTHANC", "--host", "127.0.0.1",
         "--port", port)
    assert "orthanc: ORTHANC@127.0.0.1:" in _cli(archive, capsys, "node", "list")
    assert "status 0x0000" in _cli(archive, capsys, "echo", "orthanc")

    found = _cli(archive, capsys, "find", "orthanc", "--level", "study",
                 "-k", "PatientName=DEMO*", "-k", "StudyDate=20260101-20261231")
    assert moved_uid in found and got_uid in found
    series = _cli(archive, capsys, "find", "orthanc", "--level", "series",
                  "-k", f"StudyInstanceUID={got_uid}")
    assert "Modality=CT" in series and "1 match(es)" in series

    with scp(archive, port=peer.lightbox_port):
        # C-MOVE to our own AE title: Orthanc connects back to our SCP.
        assert "completed 3, failed 0" in _cli(archive, capsys, "move", "orthanc",
                                               "--study", moved_uid)
    assert moved_sops <= _stored(archive)

    # C-GET: the instances come back over our association, into the ingest path.
    assert "completed 3, failed 0" in _cli(archive, capsys, "get", "orthanc", "--study", got_uid)
    assert got_sops <= _stored(archive)

    assert "completed 2, failed 0" in _cli(archive, capsys, "send", "orthanc", LOCAL_STUDY)
    on_orthanc = _cli(archive, capsys, "find", "orthanc", "--level", "image",
                      "-k", f"StudyInstanceUID={LOCAL_STUDY}")
    for path in local:
        assert str(pydicom.dcmread(path).SOPInstanceUID) in on_orthanc


def test_orthanc_moves_a_study_out_of_lightbox(
    archive: Archive, peer: Peer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = ROOT + "601"
    local = [write(ct_dataset(instance_number=n, study=study), tmp_path / f"{n}.dcm")
             for n in (1, 2, 3)]
    assert all(o.status is Status.STORED
               for o in store_instances(archive, [Offer(p, "test") for p in local]))
    # Orthanc is a known node: it may ask for a move, and it is the destination.
    _cli(archive, capsys, "node", "add", "orthanc", "--aet", "ORTHANC", "--host", "127.0.0.1",
         "--port", str(peer.orthanc.dicom_port))
    with scp(archive, port=peer.lightbox_port):
        peer.orthanc.post("/modalities/lightbox/move", {
            "Level": "Study", "Resources": [{"StudyInstanceUID": study}],
            "TargetAet": "ORTHANC", "Synchronous": True})
    for path in local:
        sent = pydicom.dcmread(path)
        back = pydicom.dcmread(io.BytesIO(peer.orthanc.file(str(sent.SOPInstanceUID))))
        assert back.StudyInstanceUID == study
        assert back.PixelData == sent.PixelData
        assert {e.tag for e in back} == {e.tag for e in sent}


def test_find_sends_a_name_beyond_ascii_in_utf8(
    archive: Archive, peer: Peer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Two names of as many letters, neither Latin-1: sent in any other character
    # set they would become the same string of nine replacement characters.
    for n, name in enumerate(("Διονυσιος", "Αλεξανδρα")):
        path = write(ct_dataset(study=f"{ROOT}60{n + 1}", patient_id=f"PAT-GR{n}",
                                patient_name=name, SpecificCharacterSet="ISO_IR 192"),
                     tmp_path / f"{n}.dcm")
        dcmtk("storescu", "-aec", peer.orthanc.aet, "127.0.0.1", str(peer.orthanc.dicom_port),
              str(path))
    _cli(archive, capsys, "node", "add", "orthanc", "--aet", "ORTHANC", "--host", "127.0.0.1",
         "--port", str(peer.orthanc.dicom_port))
    found = _cli(archive, capsys, "find", "orthanc", "-k", "PatientName=Διονυσιος",
                 "-k", "PatientID")
    assert f"{ROOT}601" in found and "PatientID=PAT-GR0" in found, found
    assert "1 match(es)" in found, found
