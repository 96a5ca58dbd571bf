"""The header helper process: what it answers, and what happens when it dies."""

from __future__ import annotations

import io
import pickle
import time
from concurrent.futures import Future
from pathlib import Path

import httpx
import pytest

from lightbox.archive import Archive
from lightbox.dicom.instance import InstanceRecord, MissingOrInvalidUID, read_instance
from lightbox.errors import InvalidInstance
from lightbox.services import ingest, readahead
from lightbox.services.ingest import Offer, Status
from lightbox.services.readahead import ReadAhead, read_header, serve
from lightbox.web.multipart import encode_parts
from tests.conftest import RunningServer
from tests.factories import ROOT, ct_dataset, to_bytes, write


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    good = write(ct_dataset(), tmp_path / "good.dcm")
    no_uid = ct_dataset()
    del no_uid.SOPInstanceUID
    bad_uid = tmp_path / "no-uid.dcm"
    bad_uid.write_bytes(to_bytes(no_uid))
    bare = tmp_path / "bare.dcm"  # File Meta first, no preamble: ingest fixes it up
    bare.write_bytes(to_bytes(ct_dataset())[128:])
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(bytes(128) + b"DICM" + b"\x00" * 40)
    return {"good": good, "no-uid": bad_uid, "bare": bare, "junk": junk,
            "gone": tmp_path / "missing.dcm"}


def test_answers_like_the_ingest_path(files: dict[str, Path]) -> None:
    record = read_header(str(files["good"]))
    assert isinstance(record, InstanceRecord)
    assert record == read_instance(files["good"])
    assert isinstance(read_header(str(files["no-uid"])), MissingOrInvalidUID)
    assert isinstance(read_header(str(files["junk"])), InvalidInstance)
    assert read_header(str(files["bare"])) is None  # left to ingest
    assert read_header(str(files["gone"])) is None


def test_the_helper_loop_answers_in_order(files: dict[str, Path]) -> None:
    names = ["good", "bare", "no-uid"]
    answers = io.BytesIO()
    serve(io.BytesIO(b"".join(f"{files[n]}\n".encode() for n in names)), answers)
    data, found = answers.getvalue(), []
    assert data[:4] == bytes(4)  # "ready", before any answer
    data = data[4:]
    while data:
        size = int.from_bytes(data[:4], "little")
        found.append(pickle.loads(data[4 : 4 + size]))
        data = data[4 + size :]
    assert isinstance(found[0], InstanceRecord) and found[1] is None
    assert isinstance(found[2], MissingOrInvalidUID)


def _started() -> ReadAhead:
    helper = ReadAhead()
    helper.start()
    assert helper.ready(10)
    return helper


def test_headers_are_read_inline_until_the_helper_is_ready(files: dict[str, Path]) -> None:
    helper = ReadAhead()
    try:
        assert helper.submit(files["good"]) is None  # starts it; not ready yet
        assert helper.ready(10)
        assert readahead.outcome(helper.submit(files["good"])) == read_instance(files["good"])
    finally:
        helper.stop()


def test_a_helper_that_is_behind_is_passed_over(files: dict[str, Path]) -> None:
    helper = _started()
    try:
        futures = [helper.submit(files["good"]) for _ in range(3 * readahead.MAX_WAITING)]
        assert None in futures  # the queue filled up: those are read inline
        answers = [readahead.outcome(f) for f in futures if f is not None]
        assert len(answers) >= readahead.MAX_WAITING
        assert all(a == read_instance(files["good"]) for a in answers)
    finally:
        helper.stop()


def test_a_helper_process_reads_headers(files: dict[str, Path]) -> None:
    helper = _started()
    try:
        futures = [helper.submit(files[n]) for n in ("good", "junk", "good")]
        answers = [readahead.outcome(f) for f in futures]
        assert answers[0] == answers[2] == read_instance(files["good"])
        assert isinstance(answers[1], InvalidInstance)
    finally:
        helper.stop()


def _wait_for(check: object, seconds: float = 10.0) -> None:
    end = time.monotonic() + seconds
    while not check():  # type: ignore[operator]
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_a_dead_helper_is_replaced_then_given_up(files: dict[str, Path]) -> None:
    helper = ReadAhead()
    try:
        pids = []
        for _ in range(readahead.MAX_FAILURES):
            helper.start()
            assert helper.ready(10)
            assert readahead.outcome(helper.submit(files["good"])) is not None
            proc = helper._proc
            assert proc is not None
            pids.append(proc.pid)
            proc.kill()
            _wait_for(lambda p=proc: helper._proc is not p)
        assert len(set(pids)) == readahead.MAX_FAILURES
        # Given up: ingest reads headers itself from now on.
        helper.start()
        assert helper._proc is None and helper.submit(files["good"]) is None
    finally:
        helper.stop()


def test_waiting_requests_get_no_answer_when_the_helper_dies(files: dict[str, Path]) -> None:
    helper = _started()
    try:
        proc = helper._proc
        assert proc is not None
        proc.kill()
        proc.wait()
        future = helper.submit(files["good"])  # written before the death is noticed, or not
        assert future is None or readahead.outcome(future) in (None, read_instance(files["good"]))
        _wait_for(lambda: helper._proc is not proc)
        helper.start()
        assert helper.ready(10)
        assert readahead.outcome(helper.submit(files["good"])) == read_instance(files["good"])
    finally:
        helper.stop()


def test_the_helper_ends_with_its_input(files: dict[str, Path]) -> None:
    helper = _started()
    proc = helper._proc
    assert proc is not None
    helper.stop()
    assert proc.poll() is not None


def test_uploads_are_stored_whether_or_not_the_helper_answers(server: RunningServer) -> None:
    """STOW-RS reads headers through the helper; with the helper killed halfway,
    every instance is still stored (ingest reads those headers itself)."""
    def upload(study: str) -> httpx.Response:
        body = encode_parts([("application/dicom", to_bytes(ct_dataset(
            study=study, sop=f"{study}.{n}", instance_number=n))) for n in range(1, 6)], "bnd")
        return httpx.post(f"{server.dicomweb}/studies", content=body, timeout=60, headers={
            **server.headers, "Content-Type": 'multipart/related; type="application/dicom"; '
                                              "boundary=bnd"})

    readahead.helper.start()
    assert readahead.helper.ready(10)
    first = upload(f"{ROOT}81.1")
    assert first.status_code == 200
    proc = readahead.helper._proc
    if proc is not None:
        proc.kill()
        proc.wait()
    second = upload(f"{ROOT}81.2")
    assert second.status_code == 200
    assert len(second.json()["00081199"]["Value"]) == 5
    found = httpx.get(f"{server.dicomweb}/studies/{ROOT}81.2/instances", headers=server.headers)
    assert len(found.json()) == 5


def test_ingest_reads_a_header_that_has_not_come_itself_and_takes_one_that_has(
    archive: Archive, tmp_path: Path
) -> None:
    """A STOW-RS request's last headers may still be in the helper's queue when
    its body ends: ingest reads those itself (the last first) while the helper
    finishes the earlier ones, and takes what the helper did read."""
    datasets = [ct_dataset(instance_number=n) for n in range(1, 4)]
    paths = [write(ds, tmp_path / f"{n}.dcm") for n, ds in enumerate(datasets)]
    arrived: Future[ingest.Header] = Future()
    arrived.set_result(read_instance(paths[0]))
    refused: Future[ingest.Header] = Future()
    refused.set_result(InvalidInstance("refused by the helper, for the test's sake"))
    pending: Future[ingest.Header] = Future()  # never answered
    offers = [Offer(path, f"part {n}", header=header)
              for n, (path, header) in enumerate(zip(paths, (arrived, refused, pending),
                                                     strict=True))]
    outcomes = ingest.store_instances(archive, offers)
    assert [o.status for o in outcomes] == [Status.STORED, Status.REJECTED, Status.STORED]
    assert outcomes[1].reason == "refused by the helper, for the test's sake"
    assert outcomes[0].sop_instance_uid == datasets[0].SOPInstanceUID
    assert outcomes[2].sop_instance_uid == datasets[2].SOPInstanceUID


def test_a_file_moved_away_while_its_header_is_read_is_no_refusal(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ingest may move a part into the blob store while the helper still reads
    # it, and pydicom opens the file again by name: the helper then has no
    # answer (ingest reads the moved file itself), rather than a refusal.
    moved = tmp_path / "moved.dcm"

    def read_then_move(path: Path) -> InstanceRecord:
        path.rename(moved)
        raise InvalidInstance("truncated DICOM file: [Errno 2] No such file or directory")

    monkeypatch.setattr(readahead, "read_instance", read_then_move)
    assert read_header(str(files["good"])) is None
    # A file still there keeps its reason.
    def broken(path: Path) -> InstanceRecord:
        raise InvalidInstance("unreadable DICOM header: broken")

    monkeypatch.setattr(readahead, "read_instance", broken)
    found = read_header(str(moved))
    assert isinstance(found, InvalidInstance) and "broken" in found.message
