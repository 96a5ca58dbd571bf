"""End to end with dicomweb-client (what 3D Slicer uses), on SQLite and PostgreSQL.

One study of five series is stored once per backend through STOW-RS:
three single-frame CT images, a three-frame CT, and RLE, JPEG 2000 and
JPEG baseline images from pydicom's test data (re-filed under the same
patient and study). The read-only tests share it; deletion gets its own
server per test.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom import dcmread, dcmwrite
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from requests.exceptions import HTTPError

from lightbox.archive import Archive
from lightbox.services import auth
from tests.conftest import BACKENDS, RunningServer, database_url, make_settings, serving
from tests.factories import ROOT, ct_dataset, stow_body, to_bytes, video_dataset
from tests.grants import grant

DICOM_ANY = (("application/dicom", "*"),)
PATIENT = {"PatientID": "DWC-1", "PatientName": "Lovelace^Ada"}
STUDY_LEVEL = {"StudyDate": "20240301", "StudyTime": "101500", "AccessionNumber": "ACC1",
               "StudyDescription": "Chest"}
COMPRESSED = (
    # file, series number, transfer syntax, frame media type
    ("MR_small_RLE.dcm", 3, "1.2.840.10008.1.2.5", "image/dicom-rle"),
    ("JPEG2000.dcm", 4, "1.2.840.10008.1.2.4.91", "image/jp2"),
    ("SC_rgb_jpeg_dcmtk.dcm", 5, "1.2.840.10008.1.2.4.50", "image/jpeg"),
)


@dataclass
class Instance:
    series: str
    sop: str
    data: bytes  # the Part 10 bytes sent

    @property
    def dataset(self) -> Dataset:
        return dcmread(io.BytesIO(self.data))


@dataclass
class Study:
    uid: str
    instances: list[Instance] = field(default_factory=list)

    def series(self) -> dict[str, list[Instance]]:
        out: dict[str, list[Instance]] = {}
        for item in self.instances:
            out.setdefault(item.series, []).append(item)
        return out

    def sops(self) -> list[str]:
        return sorted(i.sop for i in self.instances)

    def by_sop(self, sop: str) -> Instance:
        return next(i for i in self.instances if i.sop == sop)

    def find(self, syntax: str) -> Instance:
        return next(i for i in self.instances if i.dataset.file_meta.TransferSyntaxUID == syntax)


def _refiled(name: str, study: str, series_number: int) -> bytes:
    """A pydicom test file moved into ``study`` with fresh series/instance UIDs."""
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} is missing"
    ds = dcmread(path)
    sop = generate_uid(prefix=ROOT)
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPInstanceUID, ds.StudyInstanceUID = sop, study
    ds.SeriesInstanceUID = generate_uid(prefix=ROOT)
    ds.SeriesNumber, ds.InstanceNumber = series_number, 1
    for key, value in {**PATIENT, **STUDY_LEVEL}.items():
        setattr(ds, key, value)
    buffer = io.BytesIO()
    dcmwrite(buffer, ds)
    return buffer.getvalue()


def build_study() -> Study:
    study = Study(generate_uid(prefix=ROOT))
    axial, multi = generate_uid(prefix=ROOT), generate_uid(prefix=ROOT)
    blobs = [
        to_bytes(ct_dataset(study=study.uid, series=axial, instance_number=n, **PATIENT,
                            SliceThickness="2.5"))
        for n in (1, 2, 3)
    ]
    blobs.append(to_bytes(ct_dataset(study=study.uid, series=multi, frames=3, SeriesNumber=2,
                                     **PATIENT)))
    blobs += [_refiled(name, study.uid, number) for name, number, _, _ in COMPRESSED]
    for data in blobs:
        ds = dcmread(io.BytesIO(data))
        # What dicomweb-client sends (dcmwrite of the dataset) must be these very bytes.
        again = io.BytesIO()
        dcmwrite(again, ds)
        assert again.getvalue() == data
        study.instances.append(Instance(ds.SeriesInstanceUID, ds.SOPInstanceUID, data))
    return study


@dataclass
class Loaded:
    server: RunningServer
    client: DICOMwebClient
    study: Study
    ecg: Dataset  # a waveform, in a study of its own: bulk data inside a sequence


@pytest.fixture(scope="module", params=BACKENDS)
def loaded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Loaded]:
    data = tmp_path_factory.mktemp(f"dwc-{request.param}")
    with database_url(str(request.param), data) as url:
        archive = Archive.open(make_settings(data, url))
        try:
            with serving(archive) as server:
                client = DICOMwebClient(server.dicomweb, headers=server.headers)
                study = build_study()
                response = client.store_instances([i.dataset for i in study.instances])
                assert len(response.ReferencedSOPSequence) == len(study.instances)
                assert "FailedSOPSequence" not in response
                ecg = dcmread(str(get_testdata_file("waveform_ecg.dcm")))
                client.store_instances([ecg])
                yield Loaded(server, client, study, ecg)
        finally:
            archive.close()


def _value(item: dict[str, Any], tag: str) -> Any:
    return item[tag]["Value"][0]


def _values(item: dict[str, Any], tag: str) -> list[Any]:
    return list(item.get(tag, {}).get("Value", []))


def _encoded(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds)
    return buffer.getvalue()


def _raw_parts(loaded: Loaded | RunningServer, path: str, accept: str) -> list[bytes]:
    """Bodies of a multipart response, fetched and split by hand (byte exact)."""
    server = loaded.server if isinstance(loaded, Loaded) else loaded
    response = httpx.get(server.dicomweb + path, headers={**server.headers, "Accept": accept})
    assert response.status_code == 200, response.text
    boundary = response.headers["content-type"].split("boundary=")[1].strip('"')
    chunks = response.content.split(b"--" + boundary.encode())
    return [c.split(b"\r\n\r\n", 1)[1][:-2] for c in chunks[1:-1]]


# --- QIDO-RS -----------------------------------------------------------------


def test_search_for_studies_counts_and_modalities(loaded: Loaded) -> None:
    found = loaded.client.search_for_studies(search_filters={"PatientID": "DWC-1"})
    assert len(found) == 1
    study = found[0]
    assert _value(study, "0020000D") == loaded.study.uid
    assert _value(study, "00201206") == 5  # NumberOfStudyRelatedSeries
    assert _value(study, "00201208") == 7  # NumberOfStudyRelatedInstances
    assert sorted(_values(study, "00080061")) == ["CT", "MR", "NM", "OT"]
    assert _value(study, "00100010") == {"Alphabetic": "Lovelace^Ada"}
    assert _value(study, "00081190") == f"{loaded.server.dicomweb}/studies/{loaded.study.uid}"


def test_http_basic_with_the_token_as_password(loaded: Loaded) -> None:
    # As 3D Slicer and Kheops clients send it: any user name, the token as password.
    session = requests.Session()
    session.auth = ("slicer", loaded.server.token)
    client = DICOMwebClient(loaded.server.dicomweb, session=session)
    found = client.search_for_studies(search_filters={"StudyInstanceUID": loaded.study.uid})
    assert [s["0020000D"]["Value"][0] for s in found] == [loaded.study.uid]
    session.auth = ("slicer", "not-the-token")
    with pytest.raises(HTTPError) as refused:
        client.search_for_studies()
    assert refused.value.response.status_code == 401


def test_search_for_series_top_level_and_nested(loaded: Loaded) -> None:
    client, uid = loaded.client, loaded.study.uid
    nested = client.search_for_series(study_instance_uid=uid)
    top = client.search_for_series(search_filters={"StudyInstanceUID": uid})
    assert [_value(s, "0020000E") for s in nested] == [_value(s, "0020000E") for s in top]
    counts = {_value(s, "0020000E"): _value(s, "00201209") for s in nested}
    assert counts == {k: len(v) for k, v in loaded.study.series().items()}
    assert [_value(s, "00200011") for s in nested] == [1, 2, 3, 4, 5]
    for s in nested:
        assert _value(s, "00081190") == (
            f"{loaded.server.dicomweb}/studies/{uid}/series/{_value(s, '0020000E')}")
    assert [_value(s, "00080060") for s in client.search_for_series(
        study_instance_uid=uid, search_filters={"Modality": "MR"})] == ["MR"]


def test_search_for_instances_at_every_route(loaded: Loaded) -> None:
    client, study = loaded.client, loaded.study
    everything = client.search_for_instances(study_instance_uid=study.uid)
    assert sorted(_value(i, "00080018") for i in everything) == study.sops()
    # In the order WADO-RS retrieves them: by series number, then instance number.
    assert [(_value(i, "00200011"), _value(i, "00200013")) for i in everything] == [
        (1, 1), (1, 2), (1, 3), (2, 1), (3, 1), (4, 1), (5, 1)]
    top = client.search_for_instances(search_filters={"StudyInstanceUID": study.uid})
    assert len(top) == len(study.instances)
    axial = study.instances[0].series
    in_series = client.search_for_instances(study_instance_uid=study.uid, series_instance_uid=axial)
    assert [_value(i, "00200013") for i in in_series] == [1, 2, 3]
    multi = client.search_for_instances(
        study_instance_uid=study.uid, search_filters={"SOPInstanceUID": study.instances[3].sop})
    assert _value(multi[0], "00280008") == 3
    rle = study.find("1.2.840.10008.1.2.5")
    hit = client.search_for_instances(study.uid, rle.series)[0]
    assert _value(hit, "00083002") == "1.2.840.10008.1.2.5"  # AvailableTransferSyntaxUID
    assert _value(hit, "00280010") == 64


# --- WADO-RS instances ---------------------------------------------------------


def test_retrieve_study_series_instance_as_stored(loaded: Loaded) -> None:
    client, study = loaded.client, loaded.study
    originals = {i.sop: i.data for i in study.instances}
    got = client.retrieve_study(study.uid, media_types=DICOM_ANY)
    assert {ds.SOPInstanceUID: _encoded(ds) for ds in got} == originals
    for series, members in study.series().items():
        got = client.retrieve_series(study.uid, series, media_types=DICOM_ANY)
        assert sorted(_encoded(ds) for ds in got) == sorted(i.data for i in members)
    for item in study.instances:
        ds = client.retrieve_instance(study.uid, item.series, item.sop, media_types=DICOM_ANY)
        assert _encoded(ds) == item.data
    # The same, split by hand: the parts are the stored bytes, not a re-encoding.
    parts = _raw_parts(loaded, f"/studies/{study.uid}",
                       'multipart/related; type="application/dicom"; transfer-syntax=*')
    assert sorted(parts) == sorted(originals.values())


@pytest.mark.parametrize("syntax", [c[2] for c in COMPRESSED])
def test_default_retrieve_decompresses(loaded: Loaded, syntax: str) -> None:
    item = loaded.study.find(syntax)
    # No transfer-syntax parameter: Explicit VR Little Endian (PS3.18 §8.7.3.5.2).
    # (dicomweb-client itself defaults to transfer-syntax=*, so the type is named.)
    ds = loaded.client.retrieve_instance(loaded.study.uid, item.series, item.sop,
                                         media_types=("application/dicom",))
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPInstanceUID == item.sop
    original = item.dataset
    assert np.array_equal(ds.pixel_array, original.pixel_array)
    # Native objects come back as they are.
    ct = loaded.study.instances[0]
    again = loaded.client.retrieve_instance(loaded.study.uid, ct.series, ct.sop,
                                            media_types=("application/dicom",))
    assert _encoded(again) == ct.data
    # The same at series level, split by hand.
    parts = _raw_parts(loaded, f"/studies/{loaded.study.uid}/series/{item.series}",
                       'multipart/related; type="application/dicom"')
    assert [dcmread(io.BytesIO(p)).file_meta.TransferSyntaxUID for p in parts] == [
        ExplicitVRLittleEndian]


def test_retrieve_negotiates_among_several_choices(loaded: Loaded) -> None:
    study = loaded.study
    jpeg = study.find("1.2.840.10008.1.2.4.50")
    dicom = 'multipart/related; type="application/dicom"'
    jpeg_only = f"{dicom}; transfer-syntax=1.2.840.10008.1.2.4.50"
    # The JPEG instance as stored; the others cannot be JPEG: the next choice applies.
    for fallback, native_syntax in (("*", None), (ExplicitVRLittleEndian, ExplicitVRLittleEndian)):
        accept = f"{jpeg_only}, {dicom}; transfer-syntax={fallback}; q=0.5"
        parts = _raw_parts(loaded, f"/studies/{study.uid}", accept)
        assert len(parts) == len(study.instances)
        for part in parts:
            ds = dcmread(io.BytesIO(part))
            original = study.by_sop(ds.SOPInstanceUID)
            if original is jpeg or native_syntax is None:
                assert part == original.data
            else:
                assert ds.file_meta.TransferSyntaxUID == native_syntax
    # No acceptable choice for most of them: refused before anything is sent.
    response = httpx.get(f"{loaded.server.dicomweb}/studies/{study.uid}",
                         headers={**loaded.server.headers, "Accept": jpeg_only})
    assert response.status_code == 406
    assert _raw_parts(loaded, f"/studies/{study.uid}/series/{jpeg.series}", jpeg_only) == [
        jpeg.data]
    response = httpx.get(f"{loaded.server.dicomweb}/studies/{study.uid}",
                         headers={**loaded.server.headers, "Accept": "text/html"})
    assert response.status_code == 406


# --- WADO-RS metadata and bulk data ---------------------------------------------


def test_metadata_at_each_level(loaded: Loaded) -> None:
    client, study = loaded.client, loaded.study
    everything = client.retrieve_study_metadata(study.uid)
    assert sorted(_value(m, "00080018") for m in everything) == study.sops()
    for series, members in study.series().items():
        found = client.retrieve_series_metadata(study.uid, series)
        assert sorted(_value(m, "00080018") for m in found) == sorted(i.sop for i in members)
    ct = study.instances[0]
    one = client.retrieve_instance_metadata(study.uid, ct.series, ct.sop)
    assert _value(one, "00100020") == "DWC-1"
    assert _value(one, "00180050") == 2.5
    assert _value(one, "00280010") == 32
    for m in everything:
        uri = m["7FE00010"]["BulkDataURI"]
        assert uri.startswith(f"{loaded.server.dicomweb}/studies/{study.uid}/series/")
        assert "Value" not in m["7FE00010"] and "InlineBinary" not in m["7FE00010"]


def test_bulkdata_resolves_with_and_without_range(loaded: Loaded) -> None:
    client, study = loaded.client, loaded.study
    for item in study.instances:
        meta = client.retrieve_instance_metadata(study.uid, item.series, item.sop)
        uri = meta["7FE00010"]["BulkDataURI"]
        pixels = item.dataset.PixelData
        [whole] = client.retrieve_bulkdata(uri)
        assert whole == pixels
        [part] = client.retrieve_bulkdata(uri, byte_range=(16, 527))
        assert part == pixels[16:528]
    ct = study.instances[0]
    meta = client.retrieve_instance_metadata(study.uid, ct.series, ct.sop)
    [octets] = client.retrieve_bulkdata(meta["7FE00010"]["BulkDataURI"],
                                        media_types=("application/octet-stream",))
    assert octets == ct.dataset.PixelData


def test_bulkdata_ranges_over_http(loaded: Loaded) -> None:
    ct = loaded.study.instances[0]
    pixels = ct.dataset.PixelData
    uri = loaded.client.retrieve_instance_metadata(
        loaded.study.uid, ct.series, ct.sop)["7FE00010"]["BulkDataURI"]
    assert uri.endswith("/bulkdata/7FE00010")
    octets = {**loaded.server.headers, "Accept": "application/octet-stream"}
    tail = httpx.get(uri, headers={**octets, "Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == pixels[-10:]
    size = len(pixels)
    assert tail.headers["content-range"] == f"bytes {size - 10}-{size - 1}/{size}"
    rest = httpx.get(uri, headers={**octets, "Range": f"bytes={len(pixels) - 4}-"})
    assert rest.status_code == 206 and rest.content == pixels[-4:]
    beyond = httpx.get(uri, headers={**octets, "Range": f"bytes={len(pixels)}-"})
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == f"bytes */{len(pixels)}"
    assert httpx.get(uri, headers={**octets, "Range": "pages=1-2"}).status_code == 400


def test_bulkdata_inside_a_sequence(loaded: Loaded) -> None:
    ecg = loaded.ecg
    meta = loaded.client.retrieve_instance_metadata(
        ecg.StudyInstanceUID, ecg.SeriesInstanceUID, ecg.SOPInstanceUID)
    items = meta["54000100"]["Value"]
    assert len(items) == len(ecg.WaveformSequence) == 2
    for item, original in zip(items, ecg.WaveformSequence, strict=True):
        uri = item["54001010"]["BulkDataURI"]
        assert loaded.client.retrieve_bulkdata(uri) == [original.WaveformData]
    missing = items[0]["54001010"]["BulkDataURI"].replace("/1/54001010", "/3/54001010")
    assert _status(lambda: loaded.client.retrieve_bulkdata(missing)) == 404
    assert "7FE00010" not in meta


def test_large_bulk_data_is_sent_in_chunks_and_read_by_ranges(server: RunningServer) -> None:
    """Pixel Data of several MiB (more than one read chunk), whole and by ranges
    that cross chunk and fragment boundaries, bare and as multipart."""
    client = DICOMwebClient(server.dicomweb, headers=server.headers)
    ct = ct_dataset(size=512, frames=9)  # 4.5 MiB of native pixels
    stream = bytes(range(256)) * (3 * 4096 + 1)  # a 3 MiB video in three fragments
    video = video_dataset(generate_uid(prefix=ROOT), stream)
    client.store_instances([ct, video])
    octets = {**server.headers, "Accept": "application/octet-stream"}
    uri = client.retrieve_instance_metadata(
        ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID)["7FE00010"]["BulkDataURI"]
    whole = httpx.get(uri, headers=octets)
    assert whole.status_code == 200
    assert whole.headers["content-length"] == str(len(ct.PixelData))
    assert whole.content == ct.PixelData
    [multipart] = client.retrieve_bulkdata(uri)
    assert multipart == ct.PixelData
    mib = 1 << 20
    span = httpx.get(uri, headers={**octets, "Range": f"bytes={mib - 5}-{3 * mib + 6}"})
    assert span.status_code == 206 and span.content == ct.PixelData[mib - 5 : 3 * mib + 7]
    [part] = client.retrieve_bulkdata(uri, byte_range=(mib + 1, 2 * mib + 2))
    assert part == ct.PixelData[mib + 1 : 2 * mib + 3]

    uri = client.retrieve_instance_metadata(
        video.StudyInstanceUID, video.SeriesInstanceUID,
        video.SOPInstanceUID)["7FE00010"]["BulkDataURI"] + "?accept=video/mp4"
    played = httpx.get(uri, headers=server.headers)
    assert played.status_code == 200 and played.content == stream
    # Fragments are a third of the stream each: this range spans all three.
    third = len(stream) // 3
    seek = httpx.get(uri, headers={**server.headers, "Range": f"bytes={third - 3}-{2 * third + 3}"})
    assert seek.status_code == 206 and seek.content == stream[third - 3 : 2 * third + 4]


def _padded(ds: Dataset, size: int) -> bytes:
    """``ds`` as a Part 10 file of exactly ``size`` bytes (a private OB value pads it)."""
    block = ds.private_block(0x0011, "LIGHTBOX TEST", create=True)
    block.add_new(0x01, "OB", b"")
    bare = len(to_bytes(ds))
    block[0x01].value = bytes(size - bare)
    data = to_bytes(ds)
    assert len(data) == size
    return data


def test_files_of_one_read_chunk_and_more_come_back_whole(server: RunningServer) -> None:
    """A study retrieve reads each file in chunks of 1 MiB (all of a small one
    at once): files just under, at and just over one chunk, of two, and of
    several come back byte for byte, in a study, a series and on their own."""
    mib = 1 << 20
    study, series = generate_uid(prefix=ROOT), generate_uid(prefix=ROOT)
    files = {}
    for n, (size, frames) in enumerate([(mib - 2, 1), (mib, 1), (mib + 2, 1), (2 * mib, 3),
                                        (5 * mib + 4, 9), (4096, 1)]):
        ds = ct_dataset(study=study, series=series, size=512 if size > 4096 else 16,
                        frames=frames, instance_number=n + 1)
        files[ds.SOPInstanceUID] = _padded(ds, size)
    body, content_type = stow_body(list(files.values()))
    stored = httpx.post(f"{server.dicomweb}/studies", content=body,
                        headers={**server.headers, "Content-Type": content_type}, timeout=60)
    assert stored.status_code == 200, stored.text
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    for path in (f"/studies/{study}", f"/studies/{study}/series/{series}"):
        assert sorted(_raw_parts(server, path, accept)) == sorted(files.values())
    for sop, data in files.items():
        path = f"/studies/{study}/series/{series}/instances/{sop}"
        assert _raw_parts(server, path, accept) == [data]


def test_many_frames_in_one_request_stream_and_a_missing_one_is_refused_first(
    server: RunningServer,
) -> None:
    client = DICOMwebClient(server.dicomweb, headers=server.headers)
    ct = ct_dataset(size=256, frames=12)
    client.store_instances([ct])
    uids_ = (ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID)
    size = 256 * 256 * 2
    numbers = [12, 1, 5, 5, 7]
    got = client.retrieve_instance_frames(*uids_, frame_numbers=numbers)
    assert got == [ct.PixelData[(n - 1) * size : n * size] for n in numbers]
    path = f"{server.dicomweb}/studies/{uids_[0]}/series/{uids_[1]}/instances/{uids_[2]}"
    missing = httpx.get(f"{path}/frames/1,13", headers=server.headers)
    assert missing.status_code == 404 and "13" in missing.text


# --- WADO-RS frames ------------------------------------------------------------------


def _frame_pixels(ds: Dataset, number: int) -> bytes:
    """Frame ``number`` as pydicom decodes it, as little-endian bytes."""
    arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames") or 1)
    frame = arr[number - 1] if frames > 1 else arr
    return bytes(frame.astype(frame.dtype.newbyteorder("<")).tobytes())


def test_native_frames(loaded: Loaded) -> None:
    study = loaded.study
    multi = study.instances[3]
    frames = loaded.client.retrieve_instance_frames(study.uid, multi.series, multi.sop, [3, 1])
    ds = multi.dataset
    size = 32 * 32 * 2
    assert frames == [ds.PixelData[2 * size :], ds.PixelData[:size]]
    assert frames[1] == _frame_pixels(ds, 1)
    octets = loaded.client.retrieve_instance_frames(
        study.uid, multi.series, multi.sop, [2], media_types=("application/octet-stream",))
    assert octets == [ds.PixelData[size : 2 * size]]


@pytest.mark.parametrize(("syntax", "media"), [(c[2], c[3]) for c in COMPRESSED])
def test_compressed_frames_as_stored(loaded: Loaded, syntax: str, media: str) -> None:
    item = loaded.study.find(syntax)
    ds = item.dataset
    stored = next(generate_frames(ds.PixelData, number_of_frames=1))
    got = loaded.client.retrieve_instance_frames(
        loaded.study.uid, item.series, item.sop, [1],
        media_types=(("application/octet-stream", "*"),))
    assert got == [stored]
    got = loaded.client.retrieve_instance_frames(
        loaded.study.uid, item.series, item.sop, [1], media_types=(media,))
    assert got == [stored]


@pytest.mark.parametrize("syntax", [c[2] for c in COMPRESSED])
def test_compressed_frames_decoded_on_request(loaded: Loaded, syntax: str) -> None:
    item = loaded.study.find(syntax)
    got = loaded.client.retrieve_instance_frames(
        loaded.study.uid, item.series, item.sop, [1], media_types=("application/octet-stream",))
    assert got == [_frame_pixels(item.dataset, 1)]


def _get_frames(loaded: Loaded, item: Instance, frames: str, accept: str) -> httpx.Response:
    url = (f"{loaded.server.dicomweb}/studies/{loaded.study.uid}/series/{item.series}"
           f"/instances/{item.sop}/frames/{frames}")
    return httpx.get(url, headers={**loaded.server.headers, "Accept": accept})


SINGLE_FIRST = ("application/octet-stream; transfer-syntax=*, "
                "multipart/related; type=application/octet-stream; transfer-syntax=*")


def test_single_part_frame_when_preferred(loaded: Loaded) -> None:
    """The viewer asks for single-part frames first: the body is the frame itself,
    the same from the first request (full path) as from the next (fast path)."""
    multi = loaded.study.instances[3]
    size = 32 * 32 * 2
    for _ in range(2):
        got = _get_frames(loaded, multi, "2", SINGLE_FIRST)
        assert got.status_code == 200
        assert got.headers["content-type"] == (
            f"application/octet-stream; transfer-syntax={ExplicitVRLittleEndian}")
        assert got.content == multi.dataset.PixelData[size : 2 * size]
    # A list of frames cannot be one part: the multipart choice answers it.
    both = _get_frames(loaded, multi, "1,3", SINGLE_FIRST)
    assert both.status_code == 200
    assert both.headers["content-type"].startswith("multipart/related")
    only_single = _get_frames(loaded, multi, "1,3", "application/octet-stream")
    assert only_single.status_code == 406
    assert "multipart/related" in only_single.json()["error"]


@pytest.mark.parametrize("syntax", [c[2] for c in COMPRESSED])
def test_single_part_compressed_frame_as_stored(loaded: Loaded, syntax: str) -> None:
    item = loaded.study.find(syntax)
    got = _get_frames(loaded, item, "1", SINGLE_FIRST)
    assert got.status_code == 200
    assert got.headers["content-type"] == f"application/octet-stream; transfer-syntax={syntax}"
    assert got.content == next(generate_frames(item.dataset.PixelData, number_of_frames=1))


def test_frames_in_a_syntax_we_cannot_make_are_not_acceptable(loaded: Loaded) -> None:
    """JPEG baseline asked for a JPEG 2000 frame: Lightbox does not transcode between
    compressed syntaxes, so that choice is passed over (406 when it was the only one),
    rather than answered in another syntax."""
    item = loaded.study.find("1.2.840.10008.1.2.4.91")
    jpeg = ("multipart/related; type=application/octet-stream; "
            "transfer-syntax=1.2.840.10008.1.2.4.50")
    refused = _get_frames(loaded, item, "1", jpeg)
    assert refused.status_code == 406
    native = _get_frames(loaded, item, "1", f"{jpeg}, multipart/related; "
                                            "type=application/octet-stream; q=0.5")
    assert native.status_code == 200
    assert f"transfer-syntax={ExplicitVRLittleEndian}" in native.text[:300]


def test_missing_frame_is_404(loaded: Loaded) -> None:
    multi = loaded.study.instances[3]
    with pytest.raises(HTTPError) as info:
        loaded.client.retrieve_instance_frames(loaded.study.uid, multi.series, multi.sop, [4])
    assert info.value.response.status_code == 404


# --- rendered and thumbnails -------------------------------------------------------------


def _image(data: bytes, kind: str) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == kind
    return image


def test_rendered_with_the_client(loaded: Loaded) -> None:
    client, study = loaded.client, loaded.study
    for item in study.instances:
        jpeg = client.retrieve_instance_rendered(study.uid, item.series, item.sop,
                                                 media_types=("image/jpeg",))
        ds = item.dataset
        assert _image(jpeg, "JPEG").size == (ds.Columns, ds.Rows)
    multi = study.instances[3]
    png = client.retrieve_instance_frames_rendered(study.uid, multi.series, multi.sop, [2],
                                                   media_types=("image/png",))
    assert _image(png, "PNG").size == (32, 32)
    series = client.retrieve_series_rendered(study.uid, multi.series, media_types=("image/jpeg",))
    assert _image(series, "JPEG").size == (32, 32)


def test_rendered_and_thumbnail_at_every_level(loaded: Loaded) -> None:
    study, multi = loaded.study, loaded.study.instances[3]
    base = f"/studies/{study.uid}"
    instance = f"{base}/series/{multi.series}/instances/{multi.sop}"
    paths = [base, f"{base}/series/{multi.series}", instance, f"{instance}/frames/2"]
    with httpx.Client(base_url=loaded.server.dicomweb, headers=loaded.server.headers) as http:
        for path in paths:
            for resource in ("rendered", "thumbnail"):
                response = http.get(f"{path}/{resource}", headers={"Accept": "image/png"})
                assert response.status_code == 200, (path, resource, response.text)
                assert response.headers["content-type"] == "image/png"
                image = _image(response.content, "PNG")
                assert max(image.size) <= (128 if resource == "thumbnail" else 1024)


# --- WADO-URI -------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 3, 4, 5, 6])
def test_wado_uri(loaded: Loaded, index: int) -> None:
    item = loaded.study.instances[index]
    original = item.dataset
    params = {"requestType": "WADO", "studyUID": loaded.study.uid, "seriesUID": item.series,
              "objectUID": item.sop}
    dicom_params = {**params, "contentType": "application/dicom"}
    stored_syntax = str(original.file_meta.TransferSyntaxUID)
    with httpx.Client(base_url=loaded.server.url, headers=loaded.server.headers) as http:
        # As stored when its transfer syntax is asked for: the very bytes.
        same = http.get("/wado", params={**dicom_params, "transferSyntax": stored_syntax})
        assert same.status_code == 200
        assert same.headers["content-type"] == "application/dicom"
        assert same.content == item.data
        # By default Explicit VR Little Endian (PS3.18 §8.2.11): native files are
        # already that, byte for byte; compressed ones are decoded.
        default = http.get("/wado", params=dicom_params)
        assert default.status_code == 200
        if stored_syntax == ExplicitVRLittleEndian:
            assert default.content == item.data
        else:
            ds = dcmread(io.BytesIO(default.content))
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert ds.SOPInstanceUID == item.sop
            assert np.array_equal(ds.pixel_array, original.pixel_array)
        jpeg = http.get("/wado", params=params)
        assert jpeg.status_code == 200
        assert jpeg.headers["content-type"] == "image/jpeg"
        assert _image(jpeg.content, "JPEG").size == (original.Columns, original.Rows)
        png = http.get("/wado", params={**params, "contentType": "image/png", "frameNumber": "1"})
        assert _image(png.content, "PNG").size == (original.Columns, original.Rows)


def test_wado_uri_errors(loaded: Loaded) -> None:
    item = loaded.study.instances[3]
    params = {"requestType": "WADO", "studyUID": loaded.study.uid, "seriesUID": item.series,
              "objectUID": item.sop}
    with httpx.Client(base_url=loaded.server.url, headers=loaded.server.headers) as http:
        assert http.get("/wado", params={**params, "frameNumber": "3"}).status_code == 200
        assert http.get("/wado", params={**params, "frameNumber": "4"}).status_code == 404
        for bad in ("0", "-1", "x", "\u00b2"):
            assert http.get("/wado", params={**params, "frameNumber": bad}).status_code == 400
        assert http.get("/wado", params={**params, "objectUID": "1.2.3.4"}).status_code == 404
        assert http.get("/wado", params={**params, "objectUID": "x"}).status_code == 400
        assert http.get("/wado", params={**params, "requestType": "WADOX"}).status_code == 400
        dicom = {**params, "contentType": "application/dicom"}
        jpeg_ts = "1.2.840.10008.1.2.4.50"
        assert http.get("/wado", params={**dicom, "transferSyntax": jpeg_ts}).status_code == 406
        assert http.get("/wado", params={**dicom, "transferSyntax": "jpeg"}).status_code == 400
        assert http.get("/wado", params={**params, "contentType": "text/html"}).status_code == 406
        assert httpx.get(loaded.server.url + "/wado", params=params).status_code == 401


def _strict_json(text: str) -> Any:
    """``text`` parsed as JSON is (RFC 8259): no NaN or Infinity, as browsers parse it."""
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_floats_are_valid_json(server: RunningServer) -> None:
    # OHIF's JSON.parse refuses NaN / Infinity: they are sent as null (PS3.18 F.2.3
    # gives FL / FD no other form), while the stored file keeps them as sent.
    nan, inf = float("nan"), float("inf")
    ds = ct_dataset(DiffusionGradientOrientation=[nan, inf, 1.0],
                    RecommendedDisplayFrameRateInFloat=-inf)
    item = Dataset()
    item.DiffusionBValue = nan
    ds.MRDiffusionSequence = [item]
    data = to_bytes(ds)
    study, series, sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    client = DICOMwebClient(server.dicomweb, headers=server.headers)
    client.store_instances([dcmread(io.BytesIO(data))])
    with httpx.Client(base_url=server.dicomweb, headers=server.headers) as http:
        responses = [
            http.get(f"/studies/{study}/series/{series}/metadata"),
            http.get(f"/studies/{study}/metadata"),
            http.get(f"/studies/{study}/instances", params={"includefield": "all"}),
            # Named: "all" at study and series level leaves out image attributes.
            http.get("/studies", params={"StudyInstanceUID": study,
                                         "includefield": "00189089,00089459,00189117"}),
            http.get(f"/studies/{study}/series",
                     params={"includefield": "00189089,00089459,00189117"}),
        ]
    for response in responses:
        assert response.status_code == 200, response.text
        [found] = _strict_json(response.text)
        assert found["00189089"] == {"vr": "FD", "Value": [None, None, 1.0]}
        assert found["00089459"] == {"vr": "FL", "Value": [None]}
        assert found["00189117"]["Value"][0]["00189087"] == {"vr": "FD", "Value": [None]}
    assert _raw_parts(server, f"/studies/{study}/series/{series}/instances/{sop}",
                      'multipart/related; type="application/dicom"; transfer-syntax=*') == [data]


# --- DELETE --------------------------------------------------------------------------


def _store_small_study(server: RunningServer) -> tuple[str, list[tuple[str, str]]]:
    study, series_a, series_b = (generate_uid(prefix=ROOT) for _ in range(3))
    datasets = [ct_dataset(study=study, series=series_a, instance_number=n) for n in (1, 2)]
    datasets.append(ct_dataset(study=study, series=series_b, SeriesNumber=2))
    client = DICOMwebClient(server.dicomweb, headers=server.headers)
    client.store_instances([dcmread(io.BytesIO(to_bytes(ds))) for ds in datasets])
    return study, [(ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in datasets]


def _status(call: Any) -> int:
    with pytest.raises(HTTPError) as info:
        call()
    return int(info.value.response.status_code)


def test_delete_instance_series_and_study(server: RunningServer) -> None:
    study, items = _store_small_study(server)
    client = DICOMwebClient(server.dicomweb, headers=server.headers)
    (series_a, sop_1), (_, sop_2), (series_b, sop_3) = items

    client.delete_instance(study, series_a, sop_1)
    assert _status(lambda: client.retrieve_instance(study, series_a, sop_1)) == 404
    left = client.search_for_instances(study)
    assert sorted(_value(i, "00080018") for i in left) == sorted([sop_2, sop_3])
    assert _value(client.search_for_studies(search_filters={"StudyInstanceUID": study})[0],
                  "00201208") == 2

    client.delete_series(study, series_a)
    assert _status(lambda: client.retrieve_series(study, series_a)) == 404
    assert _status(lambda: client.retrieve_instance(study, series_a, sop_2)) == 404
    assert [_value(s, "0020000E") for s in client.search_for_series(study)] == [series_b]

    client.delete_study(study)
    assert _status(lambda: client.retrieve_study(study)) == 404
    assert _status(lambda: client.retrieve_study_metadata(study)) == 404
    assert _status(lambda: client.retrieve_instance(study, series_b, sop_3)) == 404
    assert client.search_for_studies(search_filters={"StudyInstanceUID": study}) == []
    # The stored files went with the rows.
    blobs = [p for p in Path(server.archive.settings.blob_root).rglob("*") if p.is_file()]
    assert not any(study.encode() in p.read_bytes() for p in blobs)
    assert _status(lambda: client.delete_study(study)) == 404


def test_delete_needs_an_administrator(server: RunningServer) -> None:
    study, items = _store_small_study(server)
    auth.add_user(server.archive, "reader", None, is_admin=False)
    grant(server.archive, "reader", study, role="owner")  # even a folder's owner
    token = auth.create_token(server.archive, user="reader")
    client = DICOMwebClient(server.dicomweb, headers={"Authorization": f"Bearer {token}"})
    series, sop = items[0]
    assert _status(lambda: client.delete_instance(study, series, sop)) == 403
    assert _status(lambda: client.delete_series(study, series)) == 403
    assert _status(lambda: client.delete_study(study)) == 403
    # Nothing went: the reader still sees all of it.
    assert len(client.search_for_instances(study)) == 3
    assert client.retrieve_instance(study, series, sop).SOPInstanceUID == sop


def test_a_video_is_served_as_its_stream_when_asked_with_the_accept_parameter(
    server: RunningServer,
) -> None:
    """What OHIF's video viewport does: <video src="…/bulkdata/7FE00010?accept=video/mp4">.
    The answer is the bare stream (no multipart, no DICOM items), and it can be
    read in ranges as a browser does while playing."""
    stream = bytes(range(256)) * 41 + b"end."  # even: fragments carry no padding
    study = generate_uid(prefix=ROOT)
    ds = video_dataset(study, stream)
    client = DICOMwebClient(server.dicomweb, headers=server.headers)
    client.store_instances([ds])
    meta = client.retrieve_instance_metadata(study, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    uri = meta["7FE00010"]["BulkDataURI"]
    played = httpx.get(uri + "?accept=video/mp4", headers=server.headers)
    assert played.status_code == 200, played.text
    assert played.headers["content-type"] == "video/mp4"
    assert played.content == stream
    seek = httpx.get(uri + "?accept=video/mp4", headers={**server.headers,
                                                          "Range": "bytes=100-199"})
    assert seek.status_code == 206 and seek.content == stream[100:200]
    # Another media type than the stored one: the DICOM-wrapped value, as before.
    other = httpx.get(uri + "?accept=video/mpeg", headers=server.headers)
    assert other.headers["content-type"].startswith("multipart/related")
