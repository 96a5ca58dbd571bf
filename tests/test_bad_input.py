"""Bad input over real HTTP: every case gets a 4xx with a reason and changes nothing.

A case holds when the response is a 4xx naming the reason (a JSON ``error``
and a Warning header, or for STOW-RS a FailedSOPSequence with a Failure
Reason and a Warning naming it), the index and blob store are as before,
the staging folder is empty, and the server still answers /healthz.

Servers here are shared by the tests of a module per backend (starting one
per test would cost most of the run); every test compares its own snapshot.
"""

from __future__ import annotations

import io
import socket
import struct
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian, RLELossless, generate_uid
from sqlalchemy import func, select

from lightbox.archive import Archive
from lightbox.index.schema import instances, patients, series, studies
from lightbox.services.ingest import FailureReason, Offer, store_instances
from lightbox.web.multipart import encode_parts
from tests.conftest import BACKENDS, RunningServer, database_url, make_settings, serving
from tests.factories import ROOT, ct_dataset, to_bytes

BOUNDARY = "lightbox-test-boundary-0123"
DICOM = "application/dicom"
STOW_TYPE = f'multipart/related; type="{DICOM}"; boundary={BOUNDARY}'
ALL_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'

# Tight limits for the size and paging cases.
MAX_INSTANCE = 40_000
MAX_UPLOAD = 150_000
QIDO_CAP = 3

Snapshot = tuple[dict[str, int], frozenset[str]]


# --- servers -----------------------------------------------------------------------


@pytest.fixture(scope="module", params=BACKENDS)
def shared(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    data = tmp_path_factory.mktemp("shared") / "data"
    with database_url(str(request.param), data) as url:
        archive = Archive.open(make_settings(data, url))
        try:
            with serving(archive) as running:
                yield running
        finally:
            archive.close()


@pytest.fixture(scope="module", params=BACKENDS)
def tight(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """A server with small upload limits and a small QIDO cap."""
    data = tmp_path_factory.mktemp("tight") / "data"
    with database_url(str(request.param), data) as url:
        settings = make_settings(
            data, url, max_instance_bytes=MAX_INSTANCE, max_upload_bytes=MAX_UPLOAD,
            qido_max_results=QIDO_CAP,
        )
        archive = Archive.open(settings)
        try:
            with serving(archive) as running:
                yield running
        finally:
            archive.close()


# --- checks --------------------------------------------------------------------------


def snapshot(archive: Archive) -> Snapshot:
    with archive.db.read() as conn:
        counts = {
            t.name: int(conn.execute(select(func.count()).select_from(t)).scalar_one())
            for t in (patients, studies, series, instances)
        }
    root = archive.settings.blob_root
    files = frozenset(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not p.relative_to(root).parts[0].startswith(".")
    )
    return counts, files


def staging_left(archive: Archive) -> list[str]:
    return [p.name for p in archive.blobs.staged()]


def assert_unchanged(server: RunningServer, before: Snapshot) -> None:
    assert snapshot(server.archive) == before, "bad input changed the archive"
    assert staging_left(server.archive) == []
    health = httpx.get(server.url + "/healthz", timeout=10)
    assert health.status_code == 200 and health.text == "ok"


def assert_error(response: httpx.Response, status: int, *, warning: bool = True) -> str:
    """A 4xx with a JSON reason (and, for domain errors, the same in a Warning)."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    reason = response.json()["error"]
    assert isinstance(reason, str) and reason
    if warning:
        assert response.headers["warning"].startswith('299 lightbox "')
    return reason


def assert_refused(response: httpx.Response, status: int = 409) -> list[dict[str, Any]]:
    """A STOW-RS response listing failures, each with a Failure Reason, and a Warning."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/dicom+json")
    body = response.json()
    failed: list[dict[str, Any]] = body["00081198"]["Value"]
    assert failed
    for item in failed:
        code = item["00081197"]["Value"][0]
        assert code in {int(r) for r in FailureReason}
    assert response.headers["warning"].startswith('299 lightbox "')
    return failed


def stow(
    server: RunningServer,
    body: bytes | list[bytes],
    *,
    study: str | None = None,
    content_type: str = STOW_TYPE,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    if isinstance(body, list):
        body = encode_parts([(DICOM, part) for part in body], BOUNDARY)
    url = server.dicomweb + "/studies" + (f"/{study}" if study else "")
    sent = {**server.headers, "Content-Type": content_type, **(headers or {})}
    return httpx.post(url, content=body, headers=sent, timeout=60)


def raw_request(
    server: RunningServer, method: str, raw_path: str, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw_path`` exactly as given (httpx would resolve ``..`` segments)."""
    host, port = server.url.removeprefix("http://").split(":")
    lines = [f"{method} {raw_path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    received = b""
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        for _ in range(10_000):  # bounded: a small response, then close
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    found = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        found[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), found, body


# --- bad DICOM, hand-crafted ----------------------------------------------------------


def _quiet_bytes(ds: Dataset, **kwargs: Any) -> bytes:
    """Serialise, letting pydicom write values it would warn about."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buffer, enforce_file_format=True, **kwargs)
    return buffer.getvalue()


def _without(keyword: str) -> Callable[[], bytes]:
    def make() -> bytes:
        ds = ct_dataset()
        delattr(ds, keyword)
        return _quiet_bytes(ds)

    return make


def _with_uid(keyword: str, value: str) -> Callable[[], bytes]:
    def make() -> bytes:
        ds = ct_dataset()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            setattr(ds, keyword, value)
        return _quiet_bytes(ds)

    return make


def _patch_length(data: bytes, marker: bytes, at: int, value: int, fmt: str = "<I") -> bytes:
    """Overwrite the length field ``at`` bytes after the first ``marker``."""
    index = data.find(marker)
    assert index > 0, marker
    patched = bytearray(data)
    struct.pack_into(fmt, patched, index + at, value)
    return bytes(patched)


def huge_explicit_element() -> bytes:
    ds = ct_dataset()
    ds.add_new(0x0040A160, "UT", "a text value")  # UT: a 4-byte length in explicit VR
    return _patch_length(to_bytes(ds), b"\x40\x00\x60\xa1UT", 8, 0xFFFFFFF0)


def huge_implicit_element() -> bytes:
    ds = ct_dataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    data = _quiet_bytes(ds, implicit_vr=True, little_endian=True)
    return _patch_length(data, b"\x08\x00\x30\x10", 4, 0xFFFFFFF0)  # StudyDescription


def huge_sequence() -> bytes:
    ds = ct_dataset()
    item = Dataset()
    item.CodeValue, item.CodeMeaning = "123", "a code"
    ds.ProcedureCodeSequence = Sequence([item])
    return _patch_length(to_bytes(ds), b"\x08\x00\x32\x10SQ", 8, 0xFFFFFFF0)


def pixel_data_past_end() -> bytes:
    data = to_bytes(ct_dataset())
    return _patch_length(data, b"\xe0\x7f\x10\x00OW", 8, len(data) + 10)


def native_pixel_data_undefined_length() -> bytes:
    return _patch_length(to_bytes(ct_dataset()), b"\xe0\x7f\x10\x00OW", 8, 0xFFFFFFFF)


def too_many_frames() -> bytes:
    return to_bytes(ct_dataset(size=8, NumberOfFrames=2_000_000_000))


def _encapsulated() -> bytes:
    ds = ct_dataset(size=8)
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = encapsulate([b"\x01\x00\x00\x00" + bytes(60), b"\x01\x00\x00\x00" + bytes(60)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.NumberOfFrames = 2
    return _quiet_bytes(ds)


def _fragment_item(data: bytes) -> int:
    """Offset of the first fragment's item tag (after the Basic Offset Table item)."""
    pixel = data.find(b"\xe0\x7f\x10\x00OB")
    bot = data.find(b"\xfe\xff\x00\xe0", pixel)
    (bot_length,) = struct.unpack_from("<I", data, bot + 4)
    return bot + 8 + bot_length


def bogus_fragment_length() -> bytes:
    data = bytearray(_encapsulated())
    struct.pack_into("<I", data, _fragment_item(bytes(data)) + 4, 0x7FFFFFF0)
    return bytes(data)


def misaligned_fragment_length() -> bytes:
    data = bytearray(_encapsulated())
    struct.pack_into("<I", data, _fragment_item(bytes(data)) + 4, 10)  # real: 64
    return bytes(data)


def encapsulated_without_delimiter() -> bytes:
    data = _encapsulated()
    assert data.endswith(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
    return data[:-8]


def sequences_nested_2000_deep() -> bytes:
    """A Content Sequence nesting 2,000 levels (undefined lengths), before Pixel Data."""
    base = to_bytes(ct_dataset())
    pixels = base.index(b"\xe0\x7f\x10\x00OW")
    body = struct.pack("<HH2sH", 0x0008, 0x0100, b"SH", 2) + b"X "
    opening = (struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
               + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF))
    ending = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return base[:pixels] + opening * 2000 + body + ending * 2000 + base[pixels:]


PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00"
    b"\x1f\x15\xc4\x89\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05\x18\xd8N\x00"
    b"\x00\x00\x00IEND\xaeB`\x82"
)

BAD_INSTANCES: dict[str, Callable[[], bytes]] = {
    "truncated in file meta": lambda: to_bytes(ct_dataset())[:200],
    "truncated in dataset header": lambda: to_bytes(ct_dataset())[:400],
    "truncated in pixel data": lambda: to_bytes(ct_dataset())[:-100],
    "truncated by one byte": lambda: to_bytes(ct_dataset())[:-1],
    "text": lambda: b"This is not a DICOM file, just some text.\n" * 20,
    "png": lambda: PNG,
    "empty part": lambda: b"",
    "preamble only": lambda: bytes(128) + b"DICM",
    "missing SOPInstanceUID": _without("SOPInstanceUID"),
    "missing StudyInstanceUID": _without("StudyInstanceUID"),
    "missing SeriesInstanceUID": _without("SeriesInstanceUID"),
    "missing SOPClassUID": _without("SOPClassUID"),
    "study uid with ../": _with_uid("StudyInstanceUID", "1.2.3/../../../etc/passwd"),
    "series uid with ../": _with_uid("SeriesInstanceUID", "../1.2.3"),
    "sop uid with letters": _with_uid("SOPInstanceUID", "1.2.840.abc.4"),
    "study uid over 64 chars": _with_uid("StudyInstanceUID", "1." + "2" * 70),
    "series uid with empty component": _with_uid("SeriesInstanceUID", "1.2..3"),
    "sop uid ending in a dot": _with_uid("SOPInstanceUID", "1.2.3."),
    "study uid starting with a dot": _with_uid("StudyInstanceUID", ".1.2.3"),
    "sop class uid with a space": _with_uid("SOPClassUID", "1.2.840 10008"),
    "element length 0xFFFFFFF0 (explicit)": huge_explicit_element,
    "element length 0xFFFFFFF0 (implicit)": huge_implicit_element,
    "sequence length 0xFFFFFFF0": huge_sequence,
    "pixel data longer than the file": pixel_data_past_end,
    "native pixel data of undefined length": native_pixel_data_undefined_length,
    "2 billion frames in 128 bytes": too_many_frames,
    "encapsulated fragment length 0x7FFFFFF0": bogus_fragment_length,
    "encapsulated fragment length misaligned": misaligned_fragment_length,
    "encapsulated without sequence delimiter": encapsulated_without_delimiter,
    "sequences nested 2,000 deep": sequences_nested_2000_deep,
}


# These UIDs are invalid on purpose; pydicom warns as it writes them.
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.filterwarnings("ignore:The value length .* allowed for VR UI")
@pytest.mark.parametrize("case", list(BAD_INSTANCES))
def test_bad_instance_is_refused(shared: RunningServer, case: str) -> None:
    data = BAD_INSTANCES[case]()
    before = snapshot(shared.archive)
    response = stow(shared, [data])
    (item,) = assert_refused(response)
    warning = response.headers["warning"]
    assert "part 1: " in warning and len(warning) > len('299 lightbox "part 1: "')
    assert item["00081197"]["Value"][0] != 0
    assert "00081199" not in response.json(), "nothing may be listed as stored"
    assert_unchanged(shared, before)


@pytest.mark.parametrize(
    "keyword", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"]
)
def test_missing_uid_names_the_attribute(shared: RunningServer, keyword: str) -> None:
    before = snapshot(shared.archive)
    response = stow(shared, [_without(keyword)()])
    (item,) = assert_refused(response)
    assert item["00081197"]["Value"] == [int(FailureReason.DATA_SET_DOES_NOT_MATCH_SOP_CLASS)]
    assert f"{keyword} is missing" in response.headers["warning"]
    assert_unchanged(shared, before)


@pytest.mark.parametrize("case", ["text", "png", "empty part", "truncated in pixel data"])
def test_unreadable_data_is_cannot_understand(shared: RunningServer, case: str) -> None:
    response = stow(shared, [BAD_INSTANCES[case]()])
    (item,) = assert_refused(response)
    assert item["00081197"]["Value"] == [int(FailureReason.CANNOT_UNDERSTAND)]


def test_control_characters_in_a_reason_do_not_break_the_response(
    shared: RunningServer,
) -> None:
    """A part's Content-Type is quoted in the Warning; a bare CR in it must not
    make the response unsendable (or inject a header)."""
    body = (
        f"--{BOUNDARY}\r\nContent-Type: application/x\rX-Injected: yes\u00e9\r\n\r\n"
        f"hello\r\n--{BOUNDARY}--\r\n"
    ).encode("latin-1")
    before = snapshot(shared.archive)
    response = stow(shared, body)
    assert_refused(response)
    assert "x-injected" not in response.headers
    assert response.headers["warning"].count('"') == 2
    assert_unchanged(shared, before)


def test_overrun_reason_names_the_element(shared: RunningServer) -> None:
    before = snapshot(shared.archive)
    response = stow(shared, [huge_explicit_element()])
    assert_refused(response)
    assert "(0040,A160)" in response.headers["warning"]
    assert_unchanged(shared, before)


# --- multipart framing and media types ---------------------------------------------------


def _good_body() -> bytes:
    return encode_parts([(DICOM, to_bytes(ct_dataset()))], BOUNDARY)


FRAMING: dict[str, tuple[Callable[[], bytes], str, int]] = {
    # name: (body, Content-Type, status)
    "single application/dicom body": (
        lambda: to_bytes(ct_dataset()), "application/dicom", 415),
    "json body": (lambda: b'{"a": 1}', "application/json", 415),
    "png body": (lambda: PNG, "image/png", 415),
    "png body sent as multipart": (lambda: PNG, STOW_TYPE, 400),
    "text body sent as multipart": (lambda: b"hello\r\n" * 50, STOW_TYPE, 400),
    "no content type": (_good_body, "", 415),
    "multipart/form-data": (_good_body, f"multipart/form-data; boundary={BOUNDARY}", 415),
    "related parts of another type": (
        _good_body, f'multipart/related; type="application/json"; boundary={BOUNDARY}', 415),
    "missing boundary": (_good_body, 'multipart/related; type="application/dicom"', 400),
    "empty boundary": (_good_body, 'multipart/related; type="application/dicom"; boundary=""',
                       400),
    "boundary over 70 characters": (
        _good_body, f'multipart/related; type="application/dicom"; boundary={"b" * 71}', 400),
    "boundary not in the body": (
        _good_body, 'multipart/related; type="application/dicom"; boundary=other-boundary', 400),
    "body ends before the closing delimiter": (
        lambda: _good_body()[: -len(f"--{BOUNDARY}--\r\n")], STOW_TYPE, 400),
    "body cut inside a part": (lambda: _good_body()[:700], STOW_TYPE, 400),
    "empty body": (lambda: b"", STOW_TYPE, 400),
    "closing delimiter only": (lambda: f"--{BOUNDARY}--\r\n".encode(), STOW_TYPE, 400),
    "malformed part header": (
        lambda: f"--{BOUNDARY}\r\nthis is no header\r\n\r\nxx\r\n--{BOUNDARY}--\r\n".encode(),
        STOW_TYPE, 400),
}


@pytest.mark.parametrize("case", list(FRAMING))
def test_bad_framing_is_refused(shared: RunningServer, case: str) -> None:
    make, content_type, status = FRAMING[case]
    before = snapshot(shared.archive)
    headers = {"Content-Type": content_type} if content_type else {}
    response = httpx.post(
        shared.dicomweb + "/studies", content=make(),
        headers={**shared.headers, **headers}, timeout=30,
    )
    assert_error(response, status)
    assert_unchanged(shared, before)


def test_part_over_the_instance_limit(tight: RunningServer) -> None:
    big = to_bytes(ct_dataset(size=160))  # ~51 kB > MAX_INSTANCE
    assert MAX_INSTANCE < len(big) < MAX_UPLOAD
    before = snapshot(tight.archive)
    response = stow(tight, [to_bytes(ct_dataset()), big])
    reason = assert_error(response, 413)
    assert str(MAX_INSTANCE) in reason
    assert_unchanged(tight, before)


def test_upload_over_the_request_limit(tight: RunningServer) -> None:
    parts = [to_bytes(ct_dataset(size=100)) for _ in range(8)]  # 8 x ~21 kB > MAX_UPLOAD
    assert all(len(p) < MAX_INSTANCE for p in parts) and sum(map(len, parts)) > MAX_UPLOAD
    before = snapshot(tight.archive)
    response = stow(tight, parts)
    reason = assert_error(response, 413)
    assert str(MAX_UPLOAD) in reason
    assert_unchanged(tight, before)


# --- study and series consistency ---------------------------------------------------------


def test_instance_of_another_study_than_the_url(shared: RunningServer) -> None:
    url_study = generate_uid(prefix=ROOT)
    before = snapshot(shared.archive)
    response = stow(shared, [to_bytes(ct_dataset())], study=url_study)
    (item,) = assert_refused(response, 409)
    assert item["00081197"]["Value"] == [int(FailureReason.STUDY_UID_MISMATCH)]
    assert url_study in response.headers["warning"]
    assert_unchanged(shared, before)


def test_mismatching_instance_beside_a_matching_one(shared: RunningServer) -> None:
    study = generate_uid(prefix=ROOT)
    good, stray = ct_dataset(study=study), ct_dataset()
    response = stow(shared, [to_bytes(good), to_bytes(stray)], study=study)
    (item,) = assert_refused(response, 202)
    assert item["00081155"]["Value"] == [stray.SOPInstanceUID]
    stored = response.json()["00081199"]["Value"]
    assert [s["00081155"]["Value"][0] for s in stored] == [good.SOPInstanceUID]
    assert staging_left(shared.archive) == []


def test_series_already_filed_under_another_study(shared: RunningServer) -> None:
    series_uid = generate_uid(prefix=ROOT)
    first = ct_dataset(series=series_uid)
    assert stow(shared, [to_bytes(first)]).status_code == 200
    before = snapshot(shared.archive)
    intruder = ct_dataset(series=series_uid)  # a new study claiming the same series
    response = stow(shared, [to_bytes(intruder)])
    (item,) = assert_refused(response, 409)
    assert item["00081155"]["Value"] == [intruder.SOPInstanceUID]
    assert "another study" in response.headers["warning"]
    assert_unchanged(shared, before)
    found = httpx.get(
        shared.dicomweb + "/studies", params={"StudyInstanceUID": intruder.StudyInstanceUID},
        headers=shared.headers,
    )
    assert found.status_code == 200 and found.json() == []


def test_mix_of_good_and_bad_parts(shared: RunningServer) -> None:
    good = [ct_dataset(), ct_dataset()]
    bad = {
        "text": b"not dicom",
        "truncated": to_bytes(ct_dataset())[:-100],
        "no study": _without("StudyInstanceUID")(),
    }
    parts = [to_bytes(good[0]), *bad.values(), to_bytes(good[1])]
    before_counts, before_files = snapshot(shared.archive)
    response = stow(shared, parts)
    failed = assert_refused(response, 202)
    assert len(failed) == len(bad)
    stored = response.json()["00081199"]["Value"]
    assert [s["00081155"]["Value"][0] for s in stored] == [d.SOPInstanceUID for d in good]
    warning = response.headers["warning"]
    assert all(f"part {n}: " in warning for n in (2, 3, 4))
    counts, files = snapshot(shared.archive)
    assert counts["instances"] == before_counts["instances"] + 2
    assert len(files - before_files) == 2
    assert staging_left(shared.archive) == []
    for ds in good:
        back = httpx.get(
            f"{shared.dicomweb}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}",
            headers={**shared.headers, "Accept": ALL_DICOM},
        )
        assert back.status_code == 200 and to_bytes(ds) in back.content


# --- UIDs in URL paths -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def known(shared: RunningServer) -> Dataset:
    """One stored instance with two frames, for the path and frame cases."""
    ds = ct_dataset(size=8, frames=2)
    assert stow(shared, [to_bytes(ds)]).status_code == 200
    return ds


BAD_UIDS = {
    "dot dot": "..",
    "encoded dot dot": "%2e%2e",
    "uid then encoded dot dot": "1.2.3.%2e%2e",
    "over 64 characters": "1." + "2" * 70,
    "letters": "1.2.abc",
    "empty component": "1..2",
    "encoded slash": "1.2.3%2F..%2F..",
    "sql": "1'%20OR%20'1'='1",
    "encoded nul": "1.2%00.3",
}


def _routes(study: str, series: str, sop: str, bad: str) -> list[tuple[str, str]]:
    inst = f"/studies/{study}/series/{series}/instances/{sop}"
    return [
        ("GET", f"/studies/{bad}"),
        ("GET", f"/studies/{bad}/metadata"),
        ("GET", f"/studies/{study}/series/{bad}"),
        ("GET", f"/studies/{study}/series/{bad}/metadata"),
        ("GET", f"/studies/{study}/series/{series}/instances/{bad}"),
        ("GET", f"/studies/{study}/series/{series}/instances/{bad}/frames/1"),
        ("GET", f"/studies/{study}/series/{series}/instances/{bad}/rendered"),
        ("GET", f"/studies/{bad}/thumbnail"),
        ("GET", f"{inst}/bulkdata/7FE00010".replace(sop, bad)),
        ("GET", f"/studies/{bad}/series"),
        ("GET", f"/studies/{bad}/instances"),
        ("GET", f"/studies/{study}/series/{bad}/instances"),
        ("DELETE", f"/studies/{bad}"),
        ("DELETE", f"/studies/{study}/series/{bad}"),
        ("DELETE", f"/studies/{study}/series/{series}/instances/{bad}"),
        ("POST", f"/studies/{bad}"),
    ]


@pytest.mark.parametrize("case", list(BAD_UIDS))
def test_bad_uid_in_path(shared: RunningServer, known: Dataset, case: str) -> None:
    bad = BAD_UIDS[case]
    before = snapshot(shared.archive)
    routes = _routes(known.StudyInstanceUID, known.SeriesInstanceUID, known.SOPInstanceUID, bad)
    for method, path in routes:
        headers = {**shared.headers, "Accept": "*/*"}
        if method == "POST":
            headers["Content-Type"] = STOW_TYPE
        status, found, body = raw_request(shared, method, "/dicom-web" + path, headers)
        # An encoded slash turns one segment into several: then no route matches (404).
        expected = {400, 404} if case == "encoded slash" else {400}
        assert status in expected, (method, path, status, body[:300])
        assert b'"error"' in body, (method, path, body[:300])
        if status == 400:
            assert found["warning"].startswith('299 lightbox "'), (method, path)
    assert_unchanged(shared, before)
    intact = httpx.get(
        f"{shared.dicomweb}/studies/{known.StudyInstanceUID}/metadata", headers=shared.headers
    )
    assert intact.status_code == 200


def test_literal_dot_dot_segments_are_not_resolved(shared: RunningServer, known: Dataset) -> None:
    """``/studies/X/series/../instances`` must not become ``/studies/X/instances``."""
    before = snapshot(shared.archive)
    for method, path in [
        ("GET", f"/dicom-web/studies/{known.StudyInstanceUID}/series/../instances"),
        ("GET", f"/dicom-web/studies/{known.StudyInstanceUID}/series/../metadata"),
        ("DELETE", f"/dicom-web/studies/{known.StudyInstanceUID}/series/.."),
        ("GET", "/dicom-web/studies/../../../etc/passwd"),
    ]:
        status, _, body = raw_request(shared, method, path, shared.headers)
        assert status in (400, 404), (method, path, status)
        assert b'"error"' in body
    assert_unchanged(shared, before)


# --- QIDO values -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def patients_seeded(shared: RunningServer) -> dict[str, str]:
    """Studies whose Patient IDs contain SQL and LIKE metacharacters: id -> study UID."""
    made = {}
    for pid, name in [
        ("QPAT1", "Plain^Patient"),
        ("QP%X", "Percent^Patient"),
        ("QP_Y", "Under^Score"),
        ("QO'BRIEN", "O'Brien^Pat"),
    ]:
        ds = ct_dataset(patient_id=pid, patient_name=name, StudyDescription=f"metachar {pid}")
        assert stow(shared, [to_bytes(ds)]).status_code == 200
        made[pid] = ds.StudyInstanceUID
    return made


def qido(server: RunningServer, path: str, **params: str) -> httpx.Response:
    return httpx.get(server.dicomweb + path, params=params, headers=server.headers, timeout=30)


def patient_ids(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return sorted(item["00100020"]["Value"][0] for item in response.json())


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("PatientID", "' OR 1=1 --", []),
        ("PatientID", "QP1' OR '1'='1", []),
        ("PatientID", "'; DROP TABLE studies; --", []),
        ("PatientID", "%", []),
        ("PatientID", "_", []),
        ("PatientID", "Q%", []),
        ("PatientID", "QP_X", []),  # _ is not a wildcard in DICOM
        ("PatientID", "QP%X", ["QP%X"]),
        ("PatientID", "QP_Y", ["QP_Y"]),
        ("PatientID", "*%*", ["QP%X"]),
        ("PatientID", "*_*", ["QP_Y"]),
        ("PatientID", "Q*\\*", []),
        ("PatientID", "QP?X", ["QP%X"]),
        ("PatientID", "QO'BRIEN", ["QO'BRIEN"]),
        ("PatientID", "QPAT1\\' OR 1=1 --", ["QPAT1"]),
        ("PatientName", "%", []),
        ("PatientName", "O'Brien^Pat", ["QO'BRIEN"]),
        ("PatientName", "*'*", ["QO'BRIEN"]),
        ("StudyDescription", "metachar %", []),
        ("StudyDescription", "metachar QP\\_Y", []),
        ("AccessionNumber", "%' OR ''='", []),
    ],
)
def test_qido_metacharacters_match_literally(
    shared: RunningServer, patients_seeded: dict[str, str], key: str, value: str,
    expected: list[str],
) -> None:
    before = snapshot(shared.archive)
    response = qido(shared, "/studies", **{key: value})
    assert patient_ids(response) == expected
    assert_unchanged(shared, before)
    everyone = qido(shared, "/studies", PatientID="Q*")
    assert patient_ids(everyone) == sorted(patients_seeded)


def test_qido_bare_backslash_is_an_empty_list(shared: RunningServer) -> None:
    """``\\`` is two empty values: no value to match, so a 400 naming the key, not
    every study (which is what universal matching would return)."""
    before = snapshot(shared.archive)
    reason = assert_error(qido(shared, "/studies", PatientID="\\"), 400)
    assert "PatientID" in reason
    assert_unchanged(shared, before)


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/instances", {"SOPInstanceUID": "' OR 1=1 --"}),
        ("/studies", {"StudyInstanceUID": "1.2.3%"}),
        ("/series", {"SeriesInstanceUID": "1.2.*"}),
        ("/studies", {"StudyDate": "2024' OR 1=1 --"}),
        ("/studies", {"StudyDate": "%"}),
        ("/series", {"SeriesNumber": "1 OR 1=1"}),
        ("/studies", {"includefield": "PatientID' OR 1=1 --"}),
        ("/studies", {"limit": "-1"}),
        ("/studies", {"limit": "abc"}),
        ("/studies", {"limit": "1e9"}),
        ("/studies", {"limit": "9" * 13}),
        ("/studies", {"offset": "100000000"}),
    ],
)
def test_qido_malformed_values_are_400(
    shared: RunningServer, path: str, params: dict[str, str]
) -> None:
    before = snapshot(shared.archive)
    assert_error(qido(shared, path, **params), 400)
    assert_unchanged(shared, before)


def test_qido_unknown_key_is_ignored_with_a_warning(shared: RunningServer) -> None:
    response = qido(shared, "/studies", **{"' OR 1=1 --": "x", "limit": "1"})
    assert response.status_code == 200
    assert "not supported as matching keys" in response.headers["warning"]


def test_qido_huge_limit_is_clamped_with_a_warning(tight: RunningServer) -> None:
    seeded = [ct_dataset(patient_id="LIMIT") for _ in range(QIDO_CAP + 2)]
    store_instances(
        tight.archive,
        [Offer(_written(tight.archive, ds), "seed") for ds in seeded],
    )
    before = snapshot(tight.archive)
    response = qido(tight, "/studies", PatientID="LIMIT", limit="1000000000")
    assert response.status_code == 200
    assert len(response.json()) == QIDO_CAP
    assert f"results limited to {QIDO_CAP}" in response.headers["warning"]
    # A limit under the cap is the client's own paging: no warning.
    paged = qido(tight, "/studies", PatientID="LIMIT", limit="2")
    assert paged.status_code == 200 and len(paged.json()) == 2
    assert "warning" not in paged.headers
    # Fewer matches than the cap: everything, and nothing to warn about.
    few = qido(tight, "/studies", StudyInstanceUID=seeded[0].StudyInstanceUID, limit="1000000000")
    assert few.status_code == 200 and len(few.json()) == 1 and "warning" not in few.headers
    assert_unchanged(tight, before)


def _written(archive: Archive, ds: Dataset) -> Path:
    path = archive.settings.data / f"seed-{ds.SOPInstanceUID}.dcm"
    path.write_bytes(to_bytes(ds))
    return path


# --- frames -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frames",
    ["0", "-1", "abc", "1,abc", "1,0", "1.5", ",", "1,-2", "0x1",
     ",".join(["1"] * 20_000), ",".join(str(n) for n in range(1, 10_002))],
    ids=["0", "-1", "abc", "1,abc", "1,0", "1.5", "comma", "1,-2", "hex", "20000 frames",
         "10001 frames"],
)
def test_bad_frame_lists_are_400(shared: RunningServer, known: Dataset, frames: str) -> None:
    before = snapshot(shared.archive)
    url = (
        f"{shared.dicomweb}/studies/{known.StudyInstanceUID}/series/{known.SeriesInstanceUID}"
        f"/instances/{known.SOPInstanceUID}/frames/{frames}"
    )
    response = httpx.get(url, headers={**shared.headers, "Accept": "*/*"}, timeout=30)
    assert_error(response, 400)
    assert_unchanged(shared, before)


def test_frame_beyond_the_last_is_404(shared: RunningServer, known: Dataset) -> None:
    url = (
        f"{shared.dicomweb}/studies/{known.StudyInstanceUID}/series/{known.SeriesInstanceUID}"
        f"/instances/{known.SOPInstanceUID}/frames/1,3"
    )
    response = httpx.get(url, headers={**shared.headers, "Accept": "*/*"}, timeout=30)
    assert_error(response, 404)
    good = httpx.get(url.replace("1,3", "2,1"), headers={**shared.headers, "Accept": "*/*"})
    assert good.status_code == 200


# --- authentication -------------------------------------------------------------------------------


AUTH_CASES = {
    "none": {},
    "bad token": {"Authorization": "Bearer lbx_not-a-real-token"},
    "bare scheme": {"Authorization": "Bearer"},
    "unknown scheme": {"Authorization": "Token abc"},
    "malformed basic": {"Authorization": "Basic !!!not-base64!!!"},
    "basic without password": {"Authorization": "Basic dXNlcjo="},  # "user:"
    "basic with a wrong password": {"Authorization": "Basic dXNlcjp3cm9uZw=="},  # user:wrong
}


@pytest.mark.parametrize("case", list(AUTH_CASES))
def test_unauthenticated_requests_get_401(
    shared: RunningServer, known: Dataset, case: str
) -> None:
    headers = AUTH_CASES[case]
    study, series_uid, sop = known.StudyInstanceUID, known.SeriesInstanceUID, known.SOPInstanceUID
    inst = f"/studies/{study}/series/{series_uid}/instances/{sop}"
    before = snapshot(shared.archive)
    requests = [
        ("GET", "/studies", None),
        ("GET", f"/studies/{study}/series", None),
        ("GET", f"/studies/{study}/metadata", None),
        ("GET", inst, None),
        ("GET", inst + "/frames/1", None),
        ("GET", inst + "/rendered", None),
        ("DELETE", f"/studies/{study}", None),
        ("POST", "/studies", encode_parts([(DICOM, to_bytes(ct_dataset()))], BOUNDARY)),
    ]
    for method, path, body in requests:
        sent = {**headers, "Accept": "*/*"}
        if body is not None:
            sent["Content-Type"] = STOW_TYPE
        response = httpx.request(
            method, shared.dicomweb + path, headers=sent, content=body, timeout=30
        )
        assert response.status_code == 401, (method, path, response.status_code)
        assert response.headers["www-authenticate"].lower().startswith("bearer")
        assert response.json()["error"]
    assert_unchanged(shared, before)
    still = httpx.get(f"{shared.dicomweb}/studies/{study}/metadata", headers=shared.headers)
    assert still.status_code == 200


def _posts_finished(server: RunningServer) -> float:
    """POST requests the server has finished (from its Prometheus counters)."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("lightbox_http_requests_total{") and 'method="POST"' in line
    )


def test_client_gone_mid_upload(shared: RunningServer) -> None:
    """A client that sends one whole part and half of the next, then closes."""
    parts = [to_bytes(ct_dataset()), to_bytes(ct_dataset())]
    body = encode_parts([(DICOM, p) for p in parts], BOUNDARY)
    cut = len(parts[0]) + 400 + len(parts[1]) // 2
    before = snapshot(shared.archive)
    finished = _posts_finished(shared)
    host, port = shared.url.removeprefix("http://").split(":")
    head = (
        f"POST /dicom-web/studies HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: {shared.headers['Authorization']}\r\n"
        f"Content-Type: {STOW_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode() + body[:cut])
    # The server notices the disconnect on its own schedule: poll, bounded.
    for _ in range(200):
        if _posts_finished(shared) > finished:
            break
        time.sleep(0.025)
    else:
        raise AssertionError("the server never finished the broken-off request")
    assert_unchanged(shared, before)


# --- NUL characters and numbers out of range, on every route ------------------------

NUL_PATHS = [
    "/browse/thumbnails/%00/1.jpg",
    "/browse/studies/1.2%00",
    "/folders/%00",
    "/shares/a%00b",
    "/s/%00",
    "/invite/%00",
    "/download/studies/%00.zip",
    "/dicom-web/studies/1.2%00/metadata",
]
NUL_QUERIES = [
    "/browse?name=%00",
    "/wado?requestType=WADO&studyUID=%00&seriesUID=1&objectUID=1",
    "/dicom-web/studies?PatientID=%00",
    "/dicom-web/studies?00100010=A%00*",
    "/admin/audit?actor=%00",
]


@pytest.mark.parametrize("path", NUL_PATHS + NUL_QUERIES)
def test_a_nul_in_the_url_is_400(shared: RunningServer, path: str) -> None:
    """PostgreSQL cannot bind a NUL; no route may hand one to the index. A
    page answers with its own 400 page, the rest with a JSON reason."""
    before = snapshot(shared.archive)
    response = httpx.get(shared.url + path, headers=shared.headers, timeout=30)
    if path in NUL_PATHS or path.startswith("/dicom-web"):
        assert_error(response, 400)
    else:
        assert response.status_code == 400, (response.status_code, response.text[:300])
    assert_unchanged(shared, before)


FORM_CASES = {
    "user name with a NUL": ("/login", {"username": "ad\x00min", "password": "x"}),
    "folder name with a NUL": ("/folders", {"name": "Tumour\x00board"}),
    "share link lasting 10^20 days": ("/shares", {"study": "1.2.3", "expires": "9" * 20}),
    "share link lasting NaN days": ("/shares", {"study": "1.2.3", "expires": "nan"}),
    "token id beyond any id": ("/account/tokens/99999999999999999999/revoke", {}),
}


@pytest.mark.parametrize("case", list(FORM_CASES))
def test_forms_with_a_nul_or_a_number_out_of_range_are_400(
    shared: RunningServer, case: str
) -> None:
    path, fields = FORM_CASES[case]
    before = snapshot(shared.archive)
    response = httpx.post(shared.url + path, data=fields, timeout=30,
                          headers={**shared.headers, "Origin": shared.url})
    assert response.status_code == 400, (response.status_code, response.text[:300])
    assert_unchanged(shared, before)
