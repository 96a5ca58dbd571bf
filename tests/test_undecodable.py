"""Retrieving instances whose compressed pixel data no decoder can read.

Asked for in Explicit VR Little Endian (the default of WADO-RS), such an
instance cannot be produced. Alone, that is an error status with the reason.
In a study, the others are sent and it is left out: the 200 is out before the
instance's turn comes, and cutting the stream there would lose the rest too.
As stored (``transfer-syntax=*``) every instance comes back byte for byte.
"""

from __future__ import annotations

import logging

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from lightbox import logs
from lightbox.services import sharing
from lightbox.services.auth import Principal
from tests.conftest import RunningServer
from tests.factories import ROOT, ct_dataset, stow_body, to_bytes
from tests.test_dicomweb_client import _raw_parts

ALL_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
DECODED = {"Accept": 'multipart/related; type="application/dicom"'}  # Explicit VR Little Endian


def _broken_jpeg(study: str, series: str, number: int) -> Dataset:
    """A JPEG Baseline instance whose one fragment is a JPEG header and noise."""
    ds = ct_dataset(study=study, series=series, instance_number=number, size=16)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xdb\x00\x43" + bytes(range(200)) + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


@pytest.fixture
def study(server: RunningServer) -> tuple[str, list[Dataset]]:
    """Four instances in one series: broken, fine, broken, fine."""
    uid, series = str(generate_uid(prefix=ROOT)), str(generate_uid(prefix=ROOT))
    datasets = [
        _broken_jpeg(uid, series, 1),
        ct_dataset(study=uid, series=series, instance_number=2, size=16),
        _broken_jpeg(uid, series, 3),
        ct_dataset(study=uid, series=series, instance_number=4, size=16),
    ]
    body, content_type = stow_body([to_bytes(ds) for ds in datasets])
    stored = httpx.post(server.dicomweb + "/studies", content=body, timeout=60,
                        headers={**server.headers, "Content-Type": content_type})
    assert stored.status_code == 200, stored.text
    return uid, datasets


def _instance_path(ds: Dataset) -> str:
    return (f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}")


def test_the_others_of_a_study_are_sent_and_the_broken_ones_left_out(
    server: RunningServer, study: tuple[str, list[Dataset]]
) -> None:
    uid, datasets = study
    client = DICOMwebClient(url=server.dicomweb, headers=server.headers)
    decoded = client.retrieve_study(uid)
    assert sorted(int(ds.InstanceNumber) for ds in decoded) == [2, 4]
    # The server is fine afterwards, and the stored bytes are all there.
    as_stored = _raw_parts(server, f"/studies/{uid}", ALL_AS_STORED)
    assert sorted(as_stored) == sorted(to_bytes(ds) for ds in datasets)


def test_a_broken_instance_alone_is_an_error_with_the_reason(
    server: RunningServer, study: tuple[str, list[Dataset]]
) -> None:
    _uid, datasets = study
    answer = httpx.get(server.dicomweb + _instance_path(datasets[0]),
                       headers={**server.headers, **DECODED}, timeout=60)
    assert answer.status_code == 503
    assert "cannot decompress" in answer.json()["error"]
    fine = httpx.get(server.dicomweb + _instance_path(datasets[1]),
                     headers={**server.headers, **DECODED}, timeout=60)
    assert fine.status_code == 200


def test_a_de_identified_share_leaves_the_broken_ones_out_too(
    server: RunningServer, study: tuple[str, list[Dataset]]
) -> None:
    uid, _datasets = study
    made = sharing.create_share(server.archive, Principal("admin", True), study=uid,
                                deidentify=True)
    root = f"{server.url}/s/{made.token}/dicom-web"
    client = DICOMwebClient(url=root)
    public = client.search_for_studies()[0]["0020000D"]["Value"][0]
    assert sorted(int(ds.InstanceNumber) for ds in client.retrieve_study(public)) == [2, 4]
    instances = sorted(client.search_for_instances(public),
                       key=lambda i: int(i["00200013"]["Value"][0]))
    first = instances[0]
    path = (f"/studies/{public}/series/{first['0020000E']['Value'][0]}"
            f"/instances/{first['00080018']['Value'][0]}")
    assert httpx.get(root + path, headers=DECODED, timeout=60).status_code == 503


def test_a_list_of_frames_that_cannot_be_decoded_is_an_error_not_a_cut_stream(
    server: RunningServer,
) -> None:
    ds = _broken_jpeg(str(generate_uid(prefix=ROOT)), str(generate_uid(prefix=ROOT)), 1)
    noise = b"\xff\xd8\xff\xdb\x00\x43" + bytes(range(200)) + b"\xff\xd9"
    ds.PixelData = encapsulate([noise, noise])
    ds.NumberOfFrames = 2
    body, content_type = stow_body([to_bytes(ds)])
    assert httpx.post(server.dicomweb + "/studies", content=body, timeout=60,
                      headers={**server.headers, "Content-Type": content_type}
                      ).status_code == 200
    decoded = 'multipart/related; type="application/octet-stream"'  # native frames
    answer = httpx.get(server.dicomweb + _instance_path(ds) + "/frames/1,2", timeout=60,
                       headers={**server.headers, "Accept": decoded})
    assert answer.status_code == 503
    assert "cannot decode frame 1" in answer.json()["error"]
    stored = httpx.get(server.dicomweb + _instance_path(ds) + "/frames/1,2", timeout=60,
                       headers={**server.headers, "Accept": decoded + "; transfer-syntax=*"})
    assert stored.status_code == 200
    assert stored.content.count(noise) == 2


def test_each_failure_is_logged_once_with_its_reason_and_no_traceback(
    server: RunningServer, study: tuple[str, list[Dataset]], caplog: pytest.LogCaptureFixture
) -> None:
    _uid, datasets = study
    logs.quiet_decoder_attempts()  # as every server process sets its logging up
    path = _instance_path(datasets[0])
    with caplog.at_level(logging.INFO):
        for suffix, accept in (("/rendered", "image/jpeg"), ("/thumbnail", "image/png")):
            answer = httpx.get(server.dicomweb + path + suffix, timeout=60,
                               headers={**server.headers, "Accept": accept})
            assert answer.status_code == 503
    assert not [r for r in caplog.records if r.exc_info is not None]
    lines = [r.getMessage() for r in caplog.records if r.name == "lightbox.web.errors"]
    assert len(lines) == 2 and all("cannot decode frame 1" in line for line in lines), lines
    assert lines[0].startswith(f"GET /dicom-web{path}/rendered: ")
    assert "pylibjpeg" in lines[0] and "pillow" in lines[0]  # each plugin's reason, once
