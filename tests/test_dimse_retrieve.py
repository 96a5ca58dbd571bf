"""C-MOVE (DCMTK movescu to a storescp registered as a node), C-GET (getscu), and
Storage Commitment (pynetdicom SCU, on the same and on a new association)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pynetdicom.association
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dsutils import encode, split_dataset
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from sqlalchemy import select

from lightbox.archive import Archive
from lightbox.dimse import commands, contexts, outgoing, responses, scu
from lightbox.dimse.access import operator_principal
from lightbox.dimse.status import Action, CommitmentFailure, EventType, Retrieve
from lightbox.index.schema import instances
from lightbox.services import nodes, retrieve
from lightbox.services.ingest import Offer, Status, store_instances
from tests.conftest import free_port, serving
from tests.dimse_peers import commitment_requester, dcmtk, make_corpus, scp, storescp
from tests.factories import ROOT, stow_body


@pytest.fixture
def study(archive: Archive, tmp_path: Path) -> tuple[Archive, str, list[Path]]:
    """One stored study: CT slices in JPEG 2000, as a modality might compress them."""
    files = make_corpus(tmp_path / "corpus", "--slices", "3", "--size", "64",
                        "--syntax", "jpeg2000", "--seed", "41")
    outcomes = store_instances(archive, [Offer(f, "test") for f in files])
    assert all(o.status is Status.STORED for o in outcomes)
    for aet in ("MOVESCU", "GETSCU", "COMMITSCU", "TESTSCU"):
        nodes.add_node(archive, name=aet.lower(), ae_title=aet, host="127.0.0.1", port=1)
    return archive, str(pydicom.dcmread(files[0]).StudyInstanceUID), files


def test_movescu_sends_the_study_to_a_known_node(
    study: tuple[Archive, str, list[Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive, study_uid, files = study
    lean: list[bool] = []  # each stored file sent by our own send_c_store path
    real_send_file = outgoing._send_file

    def send_file(*args: Any) -> Any:
        status = real_send_file(*args)
        lean.append(status is not None)
        return status

    monkeypatch.setattr(outgoing, "_send_file", send_file)
    with storescp(tmp_path / "received") as peer_port, scp(archive) as server:
        nodes.add_node(archive, name="viewer", ae_title="STORESCP", host="127.0.0.1",
                       port=peer_port)
        done = dcmtk("movescu", "-v", "-S", "-aec", "LIGHTBOX", "-aem", "STORESCP",
                     "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                     "127.0.0.1", str(server.port))
    received = sorted((tmp_path / "received").iterdir())
    assert len(received) == len(files), done.stdout + done.stderr
    sent = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in files}
    for path in received:
        ds = pydicom.dcmread(path)
        # storescp accepts JPEG 2000: the stored compressed pixel data travels as is.
        original = sent[ds.SOPInstanceUID]
        assert ds.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert ds.PixelData == original.PixelData
    output = done.stdout + done.stderr
    assert "Received Final Move Response (Success)" in output
    assert output.count("(Pending)") == len(files)  # one pending response per sub-operation
    assert lean == [True] * len(files)


def _move(port: int, identifier: Dataset, destination: str) -> list[Dataset]:
    ae = AE(ae_title="TESTSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(contexts.STUDY_ROOT_MOVE)
    assoc = ae.associate("127.0.0.1", port, ae_title="LIGHTBOX")
    assert assoc.is_established
    try:
        return [status for status, _ in assoc.send_c_move(identifier, destination,
                                                           contexts.STUDY_ROOT_MOVE)]
    finally:
        assoc.release()


def test_move_to_an_unknown_destination_fails_without_connecting(
    study: tuple[Archive, str, list[Path]], tmp_path: Path
) -> None:
    archive, study_uid, _files = study
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    missing_key = Dataset()
    missing_key.QueryRetrieveLevel = "SERIES"
    missing_key.StudyInstanceUID = study_uid
    with storescp(tmp_path / "received") as peer_port, scp(archive) as server:
        unknown = _move(server.port, identifier, "NOWHERE")
        # A known destination that is down: the association attempt fails.
        nodes.add_node(archive, name="down", ae_title="DOWN", host="127.0.0.1", port=free_port())
        down = _move(server.port, identifier, "DOWN")
        # A bad identifier is answered with its reason (pynetdicom relays a handler's
        # failure once the sub-association to the destination exists).
        nodes.add_node(archive, name="viewer", ae_title="STORESCP", host="127.0.0.1",
                       port=peer_port)
        bad = _move(server.port, missing_key, "STORESCP")
    assert [int(s.Status) for s in unknown] == [Retrieve.MOVE_DESTINATION_UNKNOWN]
    assert [int(s.Status) for s in down] == [Retrieve.MOVE_DESTINATION_UNKNOWN]
    assert int(bad[-1].Status) == Retrieve.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    assert "SeriesInstanceUID" in bad[-1].ErrorComment
    assert not any((tmp_path / "received").iterdir())


def test_getscu_receives_the_study_decompressed_when_it_asks_for_native(
    study: tuple[Archive, str, list[Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive, study_uid, files = study
    out = tmp_path / "got"
    out.mkdir()
    read_by_hand = []  # command sets tried; getscu's C-STORE responses read without pydicom

    def store_response(encoded: bytes, context_id: int) -> Any:
        response = real_store_response(encoded, context_id)
        read_by_hand.append(response is not None)
        return response

    real_store_response = commands.store_response
    monkeypatch.setattr(commands, "store_response", store_response)
    with scp(archive) as server:
        # getscu proposes uncompressed syntaxes only: the SCP decodes JPEG 2000 for it.
        dcmtk("getscu", "-S", "-aec", "LIGHTBOX", "-od", str(out),
              "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
              "127.0.0.1", str(server.port))
    got = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(p) for p in out.iterdir())}
    assert len(got) == len(files)
    for path in files:
        original = pydicom.dcmread(path)
        back = got[original.SOPInstanceUID]
        assert not back.file_meta.TransferSyntaxUID.is_compressed
        assert np.array_equal(back.pixel_array, original.pixel_array)
    assert read_by_hand.count(True) == len(files)  # one C-STORE response per instance


def test_what_came_by_stow_rs_comes_back_by_c_get_byte_for_byte(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Compressed and native instances up by STOW-RS; a C-GET requestor that accepts
    # their own syntaxes receives each data set exactly as it was sent, written to
    # the socket by the thread serving the C-GET (not handed to the network thread).
    writes: list[tuple[bool, bool]] = []  # (written by that thread, from the network thread)
    real_write = responses.QuickSend._write

    def write(self: Any, groups: Any) -> bool:
        done = real_write(self, groups)
        writes.append((done, threading.current_thread() is self.dul))
        return done

    monkeypatch.setattr(responses.QuickSend, "_write", write)
    # Each file sent by our own send_c_store path, on the context pynetdicom picks.
    lean: list[bool] = []
    real_send_file = outgoing._send_file

    def send_file(assoc: Any, path: Path, *args: Any) -> Any:
        status = real_send_file(assoc, path, *args)
        lean.append(status is not None)
        for (sop_class, syntax), context_id in outgoing._scu_contexts(assoc).items():
            chosen = assoc._get_valid_context(sop_class, syntax, "scu", allow_conversion=False)
            assert chosen.context_id == context_id
        return status

    monkeypatch.setattr(outgoing, "_send_file", send_file)
    files = [*make_corpus(tmp_path / "j2k", "--slices", "2", "--size", "64",
                          "--syntax", "jpeg2000", "--seed", "43"),
             *make_corpus(tmp_path / "native", "--slices", "2", "--size", "64",
                          "--syntax", "explicit", "--seed", "44")]
    sent = {}
    for path in files:
        _meta, offset = split_dataset(path)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        sent[str(ds.SOPInstanceUID)] = (path.read_bytes()[offset:], ds)
    with serving(archive) as server:
        body, content_type = stow_body([f.read_bytes() for f in files])
        response = httpx.post(f"{server.dicomweb}/studies", content=body, timeout=60,
                              headers={**server.headers, "Content-Type": content_type,
                                       "Accept": "application/dicom+json"})
        assert response.status_code == 200, response.text
    nodes.add_node(archive, name="getscu", ae_title="GETSCU", host="127.0.0.1", port=1)
    received: dict[str, bytes] = {}

    def on_store(event: Event) -> int:
        # Lightbox receives C-GET data sets to a file (chunked): read it past its meta.
        path = Path(event.dataset_path)
        _meta, offset = split_dataset(path)
        received[str(event.request.AffectedSOPInstanceUID)] = path.read_bytes()[offset:]
        return 0x0000

    ae = AE(ae_title="GETSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(contexts.STUDY_ROOT_GET)
    syntaxes = sorted({str(ds.file_meta.TransferSyntaxUID) for _, ds in sent.values()})
    sop_class = str(next(iter(sent.values()))[1].SOPClassUID)
    for syntax in syntaxes:  # one context each: an acceptor picks one syntax per context
        ae.add_requested_context(sop_class, [syntax])
    role = build_role(sop_class, scp_role=True)
    studies = {str(ds.StudyInstanceUID) for _, ds in sent.values()}
    with scp(archive) as dicom:
        assoc = ae.associate("127.0.0.1", dicom.port, ae_title="LIGHTBOX", ext_neg=[role],
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
        assert assoc.is_established
        try:
            for study_uid in studies:
                identifier = Dataset()
                identifier.QueryRetrieveLevel = "STUDY"
                identifier.StudyInstanceUID = study_uid
                statuses = [s for s, _ in assoc.send_c_get(identifier, contexts.STUDY_ROOT_GET)]
                assert statuses[-1].Status == Retrieve.SUCCESS
        finally:
            assoc.release()
    assert set(received) == set(sent)
    for sop, (data_set, _ds) in sent.items():
        assert received[sop] == data_set, sop
    # A C-STORE request and a Pending response per instance, and each final response.
    assert writes == [(True, False)] * (2 * len(files) + len(studies))
    assert lean == [True] * len(files)


# --- Storage Commitment ---------------------------------------------------------------


def _commitment_request(files: list[Path]) -> tuple[Dataset, dict[str, int | None]]:
    """Two stored instances, one never stored, one named with the wrong SOP Class."""
    stored = [pydicom.dcmread(f, stop_before_pixels=True) for f in files[:2]]
    expected: dict[str, int | None] = {str(ds.SOPInstanceUID): None for ds in stored}
    info = Dataset()
    info.TransactionUID = generate_uid(prefix=ROOT)
    items = []
    for ds in stored:
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        items.append(item)
    absent = Dataset()
    absent.ReferencedSOPClassUID = stored[0].SOPClassUID
    absent.ReferencedSOPInstanceUID = generate_uid(prefix=ROOT)
    expected[absent.ReferencedSOPInstanceUID] = CommitmentFailure.NO_SUCH_OBJECT_INSTANCE
    wrong_class = Dataset()
    wrong_class.ReferencedSOPClassUID = MRImageStorage
    wrong_class.ReferencedSOPInstanceUID = pydicom.dcmread(files[2]).SOPInstanceUID
    expected[wrong_class.ReferencedSOPInstanceUID] = CommitmentFailure.CLASS_INSTANCE_CONFLICT
    info.ReferencedSOPSequence = [*items, absent, wrong_class]
    return info, expected


def _outcomes(report: Dataset) -> dict[str, int | None]:
    found: dict[str, int | None] = {
        str(i.ReferencedSOPInstanceUID): None for i in report.get("ReferencedSOPSequence", [])
    }
    for item in report.get("FailedSOPSequence", []):
        found[str(item.ReferencedSOPInstanceUID)] = int(item.FailureReason)
    return found


def _commit_on_one_association(archive: Archive, info: Dataset) -> tuple[int, Dataset]:
    """Request commitment and wait for the report on the same association:
    the report's event type and its information."""
    reports: list[tuple[int, Dataset]] = []

    def on_report(event: Event) -> tuple[int, None]:
        reports.append((int(event.event_type or 0), event.event_information))
        return 0, None

    with scp(archive) as server:
        assoc, answered = commitment_requester(server.port, on_report)
        try:
            status, _reply = assoc.send_n_action(
                info, 1, contexts.STORAGE_COMMITMENT, contexts.STORAGE_COMMITMENT_INSTANCE)
            assert status.Status == 0
            assert answered.wait(10)
        finally:
            assoc.release()
    [report] = reports
    return report


def test_storage_commitment_reports_on_the_same_association(
    study: tuple[Archive, str, list[Path]]
) -> None:
    archive, _study_uid, files = study
    info, expected = _commitment_request(files)
    event_type, report = _commit_on_one_association(archive, info)
    assert event_type == EventType.FAILURES_EXIST
    assert report.TransactionUID == info.TransactionUID
    assert _outcomes(report) == expected



def _bad_commitment_requests() -> dict[str, tuple[Dataset | bytes | None, int, Action, str]]:
    """Name: (Action Information, or its bytes; Action Type ID; status; reason)."""
    no_transaction = Dataset()
    no_transaction.ReferencedSOPSequence = [Dataset()]
    bad_transaction = Dataset()
    bad_transaction.TransactionUID = "1.2.x"
    no_references = Dataset()
    no_references.TransactionUID = generate_uid(prefix=ROOT)
    endless = encode(no_references, False, True)
    assert endless is not None
    # A sequence of undefined length that never ends: the bytes are no dataset.
    endless += b"\x08\x00\x99\x11SQ\x00\x00\xff\xff\xff\xff"
    return {
        "no information": (None, 1, Action.MISSING_ATTRIBUTE, "Transaction UID is missing"),
        "another action": (no_references, 2, Action.NO_SUCH_ACTION_TYPE, "Action Type"),
        "no transaction": (no_transaction, 1, Action.MISSING_ATTRIBUTE, "Transaction UID"),
        "a bad transaction": (bad_transaction, 1, Action.INVALID_ARGUMENT_VALUE, "valid UID"),
        "no references": (no_references, 1, Action.MISSING_ATTRIBUTE, "Referenced SOP"),
        "unreadable": (endless, 1, Action.INVALID_ARGUMENT_VALUE,
                       "unreadable Action Information: No tag to read"),
    }


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")  # sent on purpose
@pytest.mark.parametrize("case", ["no information", "another action", "no transaction",
                                  "a bad transaction", "no references", "unreadable"])
def test_a_bad_storage_commitment_request_is_refused_with_its_reason(
    study: tuple[Archive, str, list[Path]], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, case: str,
) -> None:
    archive = study[0]
    info, action, expected, reason = _bad_commitment_requests()[case]
    if isinstance(info, bytes):
        raw = info
        monkeypatch.setattr(pynetdicom.association, "encode", lambda *args, **kwargs: raw)
        info = Dataset()
    reports: list[Event] = []
    with caplog.at_level(logging.WARNING), scp(archive) as server:
        assoc, _answered = commitment_requester(server.port, reports.append)
        try:
            status, _reply = assoc.send_n_action(
                info, action, contexts.STORAGE_COMMITMENT, contexts.STORAGE_COMMITMENT_INSTANCE)
            time.sleep(0.5)  # a report, were one sent, would come meanwhile
        finally:
            assoc.release()
    assert int(status.Status) == expected
    assert reason in status.ErrorComment
    assert reports == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_storage_commitment_refuses_an_instance_whose_file_is_gone(
    study: tuple[Archive, str, list[Path]]
) -> None:
    """Indexed is not enough: an instance whose file went missing (or shrank)
    since it was stored fails with Processing Failure, and the others commit."""
    archive, _study_uid, files = study
    kept, gone, cut = (pydicom.dcmread(f, stop_before_pixels=True) for f in files[:3])
    with archive.db.read() as conn:
        rows = conn.execute(select(instances.c.sop_instance_uid, instances.c.blob_key))
        keys = {str(uid): str(key) for uid, key in rows}
    archive.blobs.path(keys[gone.SOPInstanceUID]).unlink()
    with open(archive.blobs.path(keys[cut.SOPInstanceUID]), "r+b") as fh:
        fh.truncate(1000)
    info = Dataset()
    info.TransactionUID = generate_uid(prefix=ROOT)
    info.ReferencedSOPSequence = []
    for ds in (kept, gone, cut):
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        info.ReferencedSOPSequence.append(item)
    _event_type, report = _commit_on_one_association(archive, info)
    assert _outcomes(report) == {
        str(kept.SOPInstanceUID): None,
        str(gone.SOPInstanceUID): CommitmentFailure.PROCESSING_FAILURE,
        str(cut.SOPInstanceUID): CommitmentFailure.PROCESSING_FAILURE,
    }


def test_storage_commitment_reports_on_a_new_association_after_release(
    study: tuple[Archive, str, list[Path]]
) -> None:
    archive, _study_uid, files = study
    info, expected = _commitment_request(files)
    reports: list[Dataset] = []
    arrived = threading.Event()

    def on_report(event: Event) -> tuple[int, None]:
        reports.append(event.event_information)
        arrived.set()
        return 0, None

    # The requester listens as a node (COMMITSCU) for the report Lightbox will send.
    listener = AE(ae_title="COMMITSCU")
    listener.add_supported_context(contexts.STORAGE_COMMITMENT, scu_role=True, scp_role=True)
    port = free_port()
    nodes.remove_node(archive, "commitscu")
    nodes.add_node(archive, name="commitscu", ae_title="COMMITSCU", host="127.0.0.1", port=port)
    listening = listener.start_server(("127.0.0.1", port), block=False,
                                      evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    ae = AE(ae_title="COMMITSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(contexts.STORAGE_COMMITMENT)
    try:
        with scp(archive) as server:
            assoc = ae.associate("127.0.0.1", server.port, ae_title="LIGHTBOX")
            assert assoc.is_established
            status, _reply = assoc.send_n_action(
                info, 1, contexts.STORAGE_COMMITMENT, contexts.STORAGE_COMMITMENT_INSTANCE)
            assoc.release()  # before the report could come
            assert status.Status == 0
            assert arrived.wait(10)
    finally:
        assert listening is not None
        listening.shutdown()
    assert _outcomes(reports[0]) == expected


def test_retrieve_of_a_study_we_do_not_have_completes_with_nothing(
    study: tuple[Archive, str, list[Path]]
) -> None:
    archive, _study_uid, _files = study
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = generate_uid(prefix=ROOT)
    with scp(archive) as server:
        statuses = _move(server.port, identifier, "TESTSCU")
    assert int(statuses[-1].Status) == Retrieve.SUCCESS
    assert int(statuses[-1].NumberOfCompletedSuboperations) == 0


def test_move_counts_a_lost_object_as_a_failed_suboperation(
    study: tuple[Archive, str, list[Path]], tmp_path: Path
) -> None:
    archive, study_uid, files = study
    lost = str(pydicom.dcmread(files[1], stop_before_pixels=True).SOPInstanceUID)
    [instance] = [i for i in retrieve.find_instances(archive, operator_principal(), study_uid)
                  if i.sop_instance_uid == lost]
    archive.blobs.delete(instance.blob_key)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    with storescp(tmp_path / "received") as peer_port, scp(archive) as server:
        nodes.add_node(archive, name="viewer", ae_title="STORESCP", host="127.0.0.1",
                       port=peer_port)
        ae = AE(ae_title="TESTSCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(contexts.STUDY_ROOT_MOVE)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="LIGHTBOX")
        responses = list(assoc.send_c_move(identifier, "STORESCP", contexts.STUDY_ROOT_MOVE))
        assoc.release()
    pending = [s for s, _ in responses if s.Status == Retrieve.PENDING]
    assert [int(s.NumberOfRemainingSuboperations) for s in pending] == [2, 1, 0]
    final, failed = responses[-1]
    assert final.Status == Retrieve.WARNING_SUBOPERATIONS_FAILED
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (2, 1)
    assert failed is not None and failed.FailedSOPInstanceUIDList == lost
    assert len(list((tmp_path / "received").iterdir())) == 2


MOVE_MESSAGE_ID = 7


def _move_to_pynetdicom(
    study: tuple[Archive, str, list[Path]], on_store: Any, started: Any = None
) -> list[tuple[Dataset, Dataset | None]]:
    """MOVESCU C-MOVEs the study (Message ID 7) to DEST, a pynetdicom storage SCP
    whose C-STOREs ``on_store`` answers; ``started`` gets the move's association
    before the request goes. The C-MOVE responses."""
    archive, study_uid, files = study
    destination = AE(ae_title="DEST")
    for context in contexts.storage_proposals([(str(pydicom.dcmread(files[0]).SOPClassUID),
                                                "1.2.840.10008.1.2.4.90")]):
        destination.add_supported_context(context.abstract_syntax, context.transfer_syntax)
    port = free_port()
    server = destination.start_server(("127.0.0.1", port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        nodes.add_node(archive, name="dest", ae_title="DEST", host="127.0.0.1", port=port)
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = study_uid
        with scp(archive) as lightbox:
            ae = AE(ae_title="MOVESCU")
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
            ae.add_requested_context(contexts.STUDY_ROOT_MOVE)
            assoc = ae.associate("127.0.0.1", lightbox.port, ae_title="LIGHTBOX")
            if started is not None:
                started(assoc)
            responses = list(assoc.send_c_move(identifier, "DEST", contexts.STUDY_ROOT_MOVE,
                                               msg_id=MOVE_MESSAGE_ID))
            assoc.release()
    finally:
        server.shutdown()
    return responses


def test_each_moved_instance_names_the_move_requester_as_its_originator(
    study: tuple[Archive, str, list[Path]]
) -> None:
    """PS3.7 9.3.1.1: the C-STOREs of a C-MOVE carry the AE title of the AE that
    asked for the move, and the C-MOVE's Message ID, so that the destination can
    tell which move they belong to."""
    seen: list[tuple[str, int]] = []

    def on_store(event: Event) -> int:
        request = event.request
        seen.append((str(request.MoveOriginatorApplicationEntityTitle).strip(),
                     int(request.MoveOriginatorMessageID)))
        return 0x0000

    statuses = [s for s, _ in _move_to_pynetdicom(study, on_store)]
    assert int(statuses[-1].Status) == Retrieve.SUCCESS
    assert seen == [("MOVESCU", MOVE_MESSAGE_ID)] * len(study[2])


def test_a_cancelled_move_lists_the_failed_instances_and_counts_the_rest_remaining(
    study: tuple[Archive, str, list[Path]]
) -> None:
    """C-CANCEL during a C-MOVE: the Cancel response's Failed SOP Instance UID
    List names the sub-operations that failed, not the ones never started."""
    move: list[Association] = []
    stored: list[str] = []

    def on_store(event: Event) -> int:
        stored.append(str(event.request.AffectedSOPInstanceUID))
        if len(stored) == 1:  # refuse the first, and cancel the move meanwhile
            move[0].send_c_cancel(MOVE_MESSAGE_ID, move[0].accepted_contexts[0].context_id)
            time.sleep(0.5)
            return 0xA700
        return 0x0000

    responses = _move_to_pynetdicom(study, on_store, started=move.append)
    final, failed = responses[-1]
    assert int(final.Status) == Retrieve.CANCEL
    assert (final.NumberOfFailedSuboperations, final.NumberOfRemainingSuboperations) == (
        1, len(study[2]) - 1)
    assert failed is not None and failed.FailedSOPInstanceUIDList == stored[0]
    assert len(stored) == 1


def test_our_c_get_proposes_one_role_selection_per_sop_class(archive: Archive) -> None:
    """PS3.7 D.3.3.4: one SCP/SCU Role Selection item per SOP class, though each
    class is proposed in several contexts (one per transfer syntax)."""
    roles: list[str] = []

    def on_requested(event: Event) -> None:
        roles.extend(str(item.sop_class_uid) for item in event.assoc.requestor.user_information
                     if isinstance(item, SCP_SCU_RoleSelectionNegotiation))

    def on_find(event: Event) -> Any:  # the study holds MR images
        match = Dataset()
        match.QueryRetrieveLevel = "IMAGE"
        match.SOPClassUID = MRImageStorage
        yield 0xFF00, match

    def on_get(event: Event) -> Any:
        yield 0

    peer = AE(ae_title="PEER")
    peer.add_supported_context(contexts.STUDY_ROOT_FIND)
    peer.add_supported_context(contexts.STUDY_ROOT_GET)
    port = free_port()
    server = peer.start_server(("127.0.0.1", port), block=False, evt_handlers=[
        (evt.EVT_REQUESTED, on_requested), (evt.EVT_C_FIND, on_find), (evt.EVT_C_GET, on_get)])
    try:
        node = nodes.add_node(archive, name="peer", ae_title="PEER", host="127.0.0.1", port=port)
        result = scu.get(archive, node, generate_uid(prefix=ROOT))
    finally:
        server.shutdown()
    assert result.status == Retrieve.SUCCESS
    assert roles.count(MRImageStorage) == 1
