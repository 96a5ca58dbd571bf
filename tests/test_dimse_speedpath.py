"""The fast C-STORE path: datasets streamed from the socket into staging, merged
index transactions, and several processes writing to one index."""

from __future__ import annotations

import copy
import logging
import multiprocessing
import os
import socket
import struct
import subprocess
import threading
import time
import tracemalloc
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.dimse_messages import C_FIND_RSP, C_GET_RSP, C_MOVE_RSP, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import P_DATA_TF
from sqlalchemy import func, select

from lightbox.archive import Archive
from lightbox.dimse import commands, contexts, responses, store, streaming
from lightbox.dimse.commands import C_STORE_RQ_FIELD
from lightbox.dimse.status import Find, Store, status_dataset
from lightbox.index.db import Database
from lightbox.index.schema import instances, series, studies
from lightbox.services import indexing
from lightbox.services.ingest import Offer, Status, store_instances
from tests.dimse_peers import association_request, dcmtk, read_pdu, scp, with_settings
from tests.factories import ROOT, ct_dataset, write


def _count(archive: Archive) -> int:
    with archive.db.read() as conn:
        return int(conn.execute(select(func.count()).select_from(instances)).scalar_one())


def _send(port: int, datasets: list[Any], ae_title: str = "SPEEDSCU") -> list[int]:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="LIGHTBOX")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


@pytest.mark.parametrize(("calling_ae", "sop_suffix"), [("SCU", ""), ("ODDSCU", ".1")])
def test_file_meta_is_what_pydicom_writes(calling_ae: str, sop_suffix: str) -> None:
    request = streaming.StoreRequest(CTImageStorage, "1.2.3.44" + sop_suffix,
                                     ExplicitVRLittleEndian, calling_ae)
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(request.sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(request.sop_instance_uid)
    meta.TransferSyntaxUID = UID(request.transfer_syntax)
    meta.ImplementationClassUID = UID(contexts.IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = contexts.IMPLEMENTATION_VERSION_NAME
    meta.SourceApplicationEntityTitle = calling_ae
    expected = DicomBytesIO()
    write_file_meta_info(expected, meta, enforce_standard=True)
    assert store.file_meta(request) == expected.getvalue()


@pytest.mark.parametrize(("status", "comment", "sop"), [
    (Store.SUCCESS, None, "1.2.3.4"),
    (Store.OUT_OF_RESOURCES, "storage is not writable", "1.2.3.45"),
    (Store.CANNOT_UNDERSTAND, "odd", "1.2.3.456"),
])
def test_store_response_is_what_pynetdicom_encodes(
    status: int, comment: str | None, sop: str
) -> None:
    request = C_STORE()
    request.MessageID = 7
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = sop
    answer = C_STORE()
    answer.MessageIDBeingRespondedTo = 7
    answer.AffectedSOPClassUID = CTImageStorage
    answer.AffectedSOPInstanceUID = sop
    answer.Status = status
    if comment:
        answer.ErrorComment = comment
    message = C_STORE_RSP()
    message.primitive_to_message(answer)
    message._set_command_group_length()
    expected = encode(message.command_set, True, True)
    assert responses.store_response(request, status_dataset(status, comment)) == expected


def _find_answer(status: int, comment: str | None, identifier: bytes | None) -> C_FIND:
    answer = C_FIND()
    answer.MessageIDBeingRespondedTo = 9
    answer.AffectedSOPClassUID = contexts.STUDY_ROOT_FIND
    answer.Status = status
    answer.ErrorComment = comment
    answer.Identifier = BytesIO(identifier) if identifier is not None else None
    return answer


def _retrieve_answer(kind: type[Any], status: int, counts: tuple[int, ...],
                     identifier: bytes | None) -> Any:
    answer = kind()
    answer.MessageIDBeingRespondedTo = 65535
    answer.AffectedSOPClassUID = contexts.STUDY_ROOT_GET
    answer.Status = status
    for name, count in zip(("NumberOfRemainingSuboperations", "NumberOfCompletedSuboperations",
                            "NumberOfFailedSuboperations", "NumberOfWarningSuboperations"),
                           counts, strict=False):
        setattr(answer, name, count)
    answer.Identifier = BytesIO(identifier) if identifier is not None else None
    return answer


def _store_request(sop: str, data: bytes | None, mover: tuple[str, int] | None,
                   message_id: int = 300, priority: int = 2) -> C_STORE:
    request = C_STORE()
    request.MessageID = message_id
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = sop
    request.Priority = priority
    if mover is not None:
        request.MoveOriginatorApplicationEntityTitle, request.MoveOriginatorMessageID = mover
    request.DataSet = BytesIO(data) if data is not None else None
    return request


_FAILED_LIST = b"\x08\x00\x58\x00\x08\x00\x00\x001.2.3.4\x00"
MESSAGES = {
    "find, pending": lambda: _find_answer(Find.PENDING, None, b"\x08\x00\x52\x00\x06\x00"
                                          b"\x00\x00STUDY "),
    "find, pending, long identifier": lambda: _find_answer(
        Find.PENDING_WARNING, None, b"\x10\x00\x10\x00\x04\x00\x00\x00A^B " * 40),
    "find, final": lambda: _find_answer(Find.SUCCESS, None, None),
    "find, refused": lambda: _find_answer(Find.OUT_OF_RESOURCES,
                                          "more than 10 matches: narrow the query", None),
    "get, pending": lambda: _retrieve_answer(C_GET, 0xFF00, (12, 3, 0, 1), None),
    "get, final with failures": lambda: _retrieve_answer(C_GET, 0xB000, (0, 3, 1, 0),
                                                         _FAILED_LIST),
    "get, cancelled, no warnings counted": lambda: _retrieve_answer(C_GET, 0xFE00, (4, 2, 0),
                                                                    _FAILED_LIST),
    "move, pending": lambda: _retrieve_answer(C_MOVE, 0xFF00, (1, 0, 0, 0), None),
    "move, unknown destination": lambda: _retrieve_answer(C_MOVE, 0xA801, (), None),
    "store request": lambda: _store_request("1.2.3.4", b"\x08\x00\x18\x00" * 5000, None),
    "store request for a move": lambda: _store_request("1.2.3.45", b"\x00" * 30,
                                                       ("MOVER", 65535)),
    "store request, odd originator": lambda: _store_request("1.2.3.4", b"\x00" * 30,
                                                            ("PACS1", 0)),
}


@pytest.mark.parametrize("max_pdu", [0, 64, 16384])
@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_messages_are_what_pynetdicom_sends(name: str, max_pdu: int) -> None:
    primitive = MESSAGES[name]()
    message = (C_STORE_RQ() if isinstance(primitive, C_STORE) else
               {C_FIND: C_FIND_RSP, C_GET: C_GET_RSP, C_MOVE: C_MOVE_RSP}[type(primitive)]())
    message.primitive_to_message(primitive)
    expected = b"".join(P_DATA_TF(p).encode() for p in message.encode_msg(5, max_pdu))
    command = responses.command_set(primitive)
    assert command is not None
    data = primitive.DataSet if isinstance(primitive, C_STORE) else primitive.Identifier
    assert responses.pdus(5, command, data.getvalue() if data else b"", max_pdu) == expected


@pytest.mark.parametrize("max_pdu", [0, 16384, 1 << 20])
def test_a_data_set_read_from_its_file_is_sent_as_pynetdicom_sends_it(
    tmp_path: Path, max_pdu: int
) -> None:
    path = write(ct_dataset(size=1024), tmp_path / "ct.dcm")  # 2 MiB of pixels
    offset = 200
    request = _store_request("1.2.3.4", None, None)
    request._dataset_path = (path, offset)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    expected = b"".join(P_DATA_TF(p).encode() for p in message.encode_msg(5, max_pdu))
    command = responses.command_set(request)
    assert command is not None
    groups = list(responses.file_pdus(5, command, path, offset, max_pdu))
    assert b"".join(groups) == expected
    if max_pdu == 16384:  # handed to the DUL thread in pieces of about 1 MiB
        assert len(groups) == 4 and max(len(g) for g in groups) <= (1 << 20) + 16384


def test_a_file_read_in_short_pieces_is_still_sent_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # preadv may stop short of what was asked (a signal, a file over 2 GiB):
    # the rest is read from where it stopped, into the right places.
    path = write(ct_dataset(size=256), tmp_path / "ct.dcm")
    command = responses.command_set(_store_request("1.2.3.4", None, None))
    assert command is not None
    whole = b"".join(responses.file_pdus(5, command, path, 200, 16384))
    real = os.preadv

    def at_most_5000_bytes(fd: int, buffers: list[memoryview], offset: int) -> int:
        first = buffers[0][:5000]
        return real(fd, [first], offset)

    monkeypatch.setattr(os, "preadv", at_most_5000_bytes)
    assert b"".join(responses.file_pdus(5, command, path, 200, 16384)) == whole


def test_a_file_cut_short_while_it_is_sent_is_an_error(tmp_path: Path) -> None:
    path = write(ct_dataset(size=1024), tmp_path / "ct.dcm")  # 2 MiB: three pieces
    command = responses.command_set(_store_request("1.2.3.4", None, None))
    assert command is not None
    sending = responses.file_pdus(5, command, path, 200, 16384)
    next(sending)  # the command set
    next(sending)  # the first MiB: the file is open and its size known
    os.truncate(path, 1 << 20)
    with pytest.raises(OSError, match=r"ended \d+ bytes early"):
        list(sending)


def test_a_response_comment_is_sent_as_lo_in_ascii() -> None:
    # Error Comment is LO (64 characters at most) in the default repertoire.
    command = responses.command_set(_find_answer(Find.UNABLE_TO_PROCESS, "é" * 70, None))
    assert command is not None
    assert decode(BytesIO(command), True, True).ErrorComment == "?" * 64


def test_other_messages_are_left_to_pynetdicom() -> None:
    offending = _find_answer(Find.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, None, None)
    offending.OffendingElement = [0x00100010]
    request = C_FIND()
    request.MessageID = 1
    echo = C_ECHO()
    echo.MessageIDBeingRespondedTo = 1
    echo.Status = 0
    beyond_ascii = _store_request("1.2.3.4", None, None)
    beyond_ascii.MessageIDBeingRespondedTo, beyond_ascii.Status = 300, 0
    beyond_ascii._affected_sop_instance_uid = "1.2.3.4\xfd"  # as a peer sent it, unchecked
    too_many = _retrieve_answer(C_GET, 0xFF00, (70000, 0, 0, 0), None)
    assert [responses.command_set(p) for p in (offending, request, echo, beyond_ascii, too_many)
            ] == [None] * 5


_PRIMITIVE_FIELDS = ("MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "Priority",
                     "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID")


@pytest.mark.parametrize(("sop", "mover"), [
    ("1.2.3.4", None),  # even length
    ("1.2.3.45", ("MOVER", 12)),  # odd length: padded with a NUL
    ("1.2.826.0.1.3680043.8.498." + "1" * 37, ("PACS AE ", 65535)),
])
def test_store_request_read_by_hand_is_what_pynetdicom_decodes(
    sop: str, mover: tuple[str, int] | None
) -> None:
    request = _store_request(sop, b"\x00", mover, 7, 1)  # a C-STORE-RQ announces a dataset
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    message._set_command_group_length()
    encoded = encode(message.command_set, True, True)
    received = C_STORE_RQ()  # what pynetdicom makes of the bytes
    received.command_set = decode(BytesIO(encoded), True, True)
    expected = received.message_to_primitive()
    command = commands.Command.read(encoded)
    assert command is not None and command.number(0x0100) == commands.C_STORE_RQ_FIELD
    assert command.number(0x0800) != commands.NO_DATA_SET
    found = command.request(3)
    assert {f: getattr(found, f) for f in _PRIMITIVE_FIELDS} == {
        f: getattr(expected, f) for f in _PRIMITIVE_FIELDS}
    assert found._context_id == 3
    # Valid as a request: one left to pynetdicom's own handling is served, not ignored.
    assert found.is_valid_request and expected.is_valid_request


def _store_response_bytes(status: int, sop_class: str | None, sop: str | None,
                          comment: str | None = None) -> bytes:
    """A C-STORE-RSP command set as pynetdicom encodes it."""
    response = C_STORE()
    response.MessageIDBeingRespondedTo = 65535
    if sop_class is not None:
        response.AffectedSOPClassUID = sop_class
    if sop is not None:
        response.AffectedSOPInstanceUID = sop
    response.Status = status
    if comment is not None:
        response.ErrorComment = comment
    message = C_STORE_RSP()
    message.primitive_to_message(response)
    message._set_command_group_length()
    return encode(message.command_set, True, True)


@pytest.mark.parametrize("status", [0x0000, 0xB000, 0xA700, 0xC000, 0xFFFF])
@pytest.mark.parametrize(("sop_class", "sop"), [
    (CTImageStorage, "1.2.3.4"),  # even length
    (MRImageStorage, "1.2.3.45"),  # odd length: padded with a NUL
    (CTImageStorage, "1.2.826.0.1.3680043.8.498." + "1" * 38),
    (None, None),  # both left out, as a response may
])
def test_store_response_read_by_hand_is_what_pynetdicom_decodes(
    status: int, sop_class: str | None, sop: str | None
) -> None:
    """What C-GET and C-MOVE receive for every instance they send."""
    encoded = _store_response_bytes(status, sop_class, sop)
    received = C_STORE_RSP()  # what pynetdicom makes of the bytes
    received.command_set = decode(BytesIO(encoded), True, True)
    expected = received.message_to_primitive()
    found = commands.store_response(encoded, 5)
    assert found is not None
    for primitive in (found, expected):  # pynetdicom's path also notes where no data set went
        for name in ("_dataset_path", "_dataset_file"):
            vars(primitive).pop(name, None)
    assert vars(found) == {**vars(expected), "_context_id": 5}
    assert found.is_valid_response


def test_other_store_responses_are_left_to_pynetdicom() -> None:
    """An Error Comment, a request, a missing Status, a UID beyond ASCII, a
    command set cut short: pynetdicom decodes those (and says what is wrong)."""
    usual = _store_response_bytes(0, CTImageStorage, "1.2.3.4")
    assert commands.store_response(usual, 1) is not None
    with_comment = _store_response_bytes(0xC000, CTImageStorage, "1.2.3.4", "not stored")
    request = C_STORE_RQ()
    request.primitive_to_message(_store_request("1.2.3.4", b"\x00", None, 7, 1))
    request._set_command_group_length()
    no_status = usual.replace(b"\x00\x00\x00\x09\x02\x00\x00\x00\x00\x00", b"")
    assert len(no_status) == len(usual) - 10  # the Status element is gone
    beyond_ascii = usual.replace(b"1.2.3.4\x00", b"1.2.3.\xe9\x00")
    assert len(beyond_ascii) == len(usual) and commands.Command.read(beyond_ascii) is not None
    for encoded in (with_comment, encode(request.command_set, True, True), no_status,
                    beyond_ascii, usual[:-3]):
        assert commands.store_response(encoded, 1) is None


def test_requests_left_to_pynetdicom_are_stored_and_answered(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A streamed C-STORE that the receiving thread does not answer (the
    association not yet marked established, say) goes to pynetdicom's own
    handling, with the request primitive read by hand."""
    monkeypatch.setattr(streaming.StreamingDIMSE, "_answer", lambda *_args: False)
    datasets = [ct_dataset() for _ in range(3)]
    for i, ds in enumerate(datasets):
        write(ds, tmp_path / f"{i}.dcm")
    with scp(archive) as server:
        done = dcmtk("storescu", "-aec", "LIGHTBOX", "127.0.0.1", str(server.port),
                     *(str(tmp_path / f"{i}.dcm") for i in range(3)))
    assert done.returncode == 0
    assert _count(archive) == 3


@pytest.mark.parametrize("encoded", [
    b"\x00\x00\x00\x01\x04\x00\x00\x00\x00\x00",  # an element outside group 0000
    b"\x00\x00\x02\x00\x40\x00\x00\x00" + b"1.2",  # a length past the end
    b"\x00\x00\x02\x00",  # a header cut short
])
def test_unusual_command_sets_are_left_to_pydicom(encoded: bytes) -> None:
    assert commands.Command.read(encoded) is None


def test_status_with_more_than_a_comment_is_left_to_pynetdicom() -> None:
    request = C_STORE()
    request.MessageID = 1
    status = status_dataset(Store.CANNOT_UNDERSTAND, "bad")
    status.OffendingElement = [0x00080018]
    assert responses.store_response(request, status) is None


def test_peer_with_a_tiny_pdu_gets_its_answer_in_fragments(archive: Archive) -> None:
    # A failure with a long comment does not fit one 128-byte PDU: pynetdicom
    # splits the answer, and the peer still reads it.
    ae = AE(ae_title="TINYPDU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.maximum_pdu_size = 128
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    good = ct_dataset(size=64)
    bad = ct_dataset(size=64)
    del bad.StudyInstanceUID
    with scp(archive) as server:
        assoc = ae.associate("127.0.0.1", server.port, ae_title="LIGHTBOX")
        assert assoc.is_established
        try:
            stored = assoc.send_c_store(good)
            refused = assoc.send_c_store(bad)
        finally:
            assoc.release()
    assert stored.Status == Store.SUCCESS
    assert refused.Status != Store.SUCCESS and "StudyInstanceUID" in str(refused.ErrorComment)
    assert _count(archive) == 1


def test_dataset_in_many_small_pdus_is_stored_as_sent(archive: Archive) -> None:
    # A 16 KiB maximum PDU cuts a 128 KiB image into some ten P-DATA PDUs.
    small_pdus = with_settings(archive, dicom_max_pdu=16384)
    sent = ct_dataset(size=256, sop=generate_uid(prefix=ROOT))
    with scp(small_pdus) as server:
        assert _send(server.port, [sent]) == [Store.SUCCESS]
    with archive.db.read() as conn:
        key = conn.execute(select(instances.c.blob_key)).scalar_one()
    stored = pydicom.dcmread(archive.blobs.path(key))
    assert stored.file_meta.ImplementationClassUID == contexts.IMPLEMENTATION_CLASS_UID
    assert stored.file_meta.SourceApplicationEntityTitle == "SPEEDSCU"
    assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert stored.SOPInstanceUID == sent.SOPInstanceUID
    assert stored.PixelData == sent.PixelData
    assert not archive.blobs.staged()


def _wire_store(ds: Any, max_pdu: int) -> bytes:
    """A C-STORE-RQ on presentation context 1 as the P-DATA-TF PDUs a peer with
    a maximum PDU of ``max_pdu`` bytes sends."""
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 0
    request.DataSet = BytesIO(encode(ds, False, True))
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    pdus = []
    for primitive in message.encode_msg(1, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        pdus.append(pdu.encode())
    return b"".join(pdus)


@pytest.mark.parametrize("piece", [0, 4093, 5])
def test_pdus_read_together_are_each_handled_in_order(archive: Archive, piece: int) -> None:
    """A dataset in some 32 PDUs of 1 KiB with the A-RELEASE-RQ right behind it: read
    from the socket in large pieces (piece 0: sent at once) or trickled in pieces
    that cut headers in two, every PDU is handled, the release last."""
    sent = ct_dataset(size=128, sop=generate_uid(prefix=ROOT))  # 32 KiB of pixels
    wire = _wire_store(sent, 1024)
    assert wire.count(b"\x04\x00\x00\x00\x04") >= 32  # many P-DATA-TF PDUs of 1 KiB
    wire += b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"  # A-RELEASE-RQ
    with scp(archive) as server, socket.create_connection(("127.0.0.1", server.port),
                                                           timeout=10) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.sendall(association_request("LIGHTBOX", CTImageStorage))
        assert read_pdu(raw)[0] == 0x02  # A-ASSOCIATE-AC
        for start in range(0, len(wire), piece or len(wire)):
            raw.sendall(wire[start:start + (piece or len(wire))])
            if piece and start // piece % 16 == 0:
                time.sleep(0.001)  # let the SCP read a piece on its own
        answer = read_pdu(raw)
        assert answer[0] == 0x04  # P-DATA-TF: the C-STORE-RSP in one PDU
        response = decode(BytesIO(answer[12:]), True, True)
        assert "CommandField" in response, answer[:200]
        assert response.CommandField == 0x8001 and response.Status == Store.SUCCESS
        assert response.AffectedSOPInstanceUID == sent.SOPInstanceUID
        assert read_pdu(raw)[0] == 0x06  # A-RELEASE-RP, after the answer
    with archive.db.read() as conn:
        key = conn.execute(select(instances.c.blob_key)).scalar_one()
    stored = pydicom.dcmread(archive.blobs.path(key))
    assert stored.SOPInstanceUID == sent.SOPInstanceUID
    assert stored.PixelData == sent.PixelData


def test_an_answer_sent_while_the_release_waits_is_whole(archive: Archive) -> None:
    """A request the receiving thread leaves to pynetdicom (here a C-STORE
    naming another SOP Class than its context's) is answered by the
    association's thread, after the A-RELEASE-RQ right behind it has moved
    the association to the state where the release waits (PS3.8 Sta8, where
    a P-DATA request is action AR-7): that answer is a whole message too,
    then comes the release response."""
    sent = ct_dataset(size=8, sop=generate_uid(prefix=ROOT))
    sent.SOPClassUID = MRImageStorage
    wire = _wire_store(sent, 16384) + b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
    with scp(archive) as server, socket.create_connection(("127.0.0.1", server.port),
                                                           timeout=10) as raw:
        raw.sendall(association_request("LIGHTBOX", CTImageStorage))
        assert read_pdu(raw)[0] == 0x02  # A-ASSOCIATE-AC
        time.sleep(0.2)  # the association is established on both threads
        raw.sendall(wire)
        answer = read_pdu(raw)
        assert answer[0] == 0x04 and answer[11] == 0x03  # the whole command, in one PDU
        response = decode(BytesIO(answer[12:]), True, True)
        assert response.CommandField == 0x8001
        assert response.AffectedSOPInstanceUID == sent.SOPInstanceUID
        assert read_pdu(raw)[0] == 0x06  # A-RELEASE-RP


def test_a_large_dataset_goes_to_disk_in_bounded_memory(archive: Archive) -> None:
    """A 32 MB image arriving over DIMSE is written to its file as it comes:
    the SCP's memory grows by a small fraction of it."""
    sent = ct_dataset(size=2048, frames=4, sop=generate_uid(prefix=ROOT))
    wire = _wire_store(sent, 65536)  # made before tracing: the sender's bytes
    assert len(wire) > 32_000_000
    with scp(archive) as server, socket.create_connection(("127.0.0.1", server.port),
                                                           timeout=30) as raw:
        raw.sendall(association_request("LIGHTBOX", CTImageStorage))
        assert read_pdu(raw)[0] == 0x02  # A-ASSOCIATE-AC
        tracemalloc.start()
        try:
            raw.sendall(wire)
            answer = read_pdu(raw)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    response = decode(BytesIO(answer[12:]), True, True)
    assert response.Status == Store.SUCCESS
    assert peak < 4_000_000, f"peak {peak} bytes while receiving {len(wire)}"
    with archive.db.read() as conn:
        key = conn.execute(select(instances.c.blob_key)).scalar_one()
    assert pydicom.dcmread(archive.blobs.path(key)).PixelData == sent.PixelData


def test_parallel_associations_store_everything_with_consistent_counts(
    archive: Archive, tmp_path: Path
) -> None:
    # Four storescu processes at once. (Four pynetdicom associations in
    # threads of this process would be a flaky client: pynetdicom's reactor
    # can take a C-STORE response off the queue before send_c_store reads it,
    # and the send then waits out its DIMSE timeout.)
    study = generate_uid(prefix=ROOT)
    folders = []
    for n in range(4):
        folder = tmp_path / f"association{n}"
        folder.mkdir()
        series_uid = generate_uid(prefix=ROOT)
        for i in range(1, 7):
            write(ct_dataset(study=study, series=series_uid, instance_number=i),
                  folder / f"{i}.dcm")
        folders.append(folder)
    with scp(archive) as server:
        senders = [subprocess.Popen(["storescu", "-aec", "LIGHTBOX", "+sd", "127.0.0.1",
                                     str(server.port), str(folder)],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                   for folder in folders]
        outputs = [sender.communicate(timeout=120)[0] for sender in senders]
    assert [sender.returncode for sender in senders] == [0, 0, 0, 0], outputs
    assert _count(archive) == 24
    with archive.db.read() as conn:
        row = conn.execute(select(studies.c.number_of_series, studies.c.number_of_instances)
                           ).one()
        per_series = conn.execute(select(series.c.number_of_instances)).scalars().all()
    assert tuple(row) == (4, 24)
    assert sorted(per_series) == [6, 6, 6, 6]


def test_callers_arriving_during_a_commit_share_the_next_one(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []
    first_started = threading.Event()
    real_index = indexing._index

    def slow_index(arch: Archive, items: Any) -> Any:
        batches.append(len(items))
        if len(batches) == 1:
            first_started.set()
            time.sleep(0.5)  # the others queue up meanwhile
        return real_index(arch, items)

    monkeypatch.setattr(indexing, "_index", slow_index)
    files = [write(ct_dataset(), tmp_path / f"{n}.dcm") for n in range(5)]
    outcomes: dict[int, Status] = {}

    def offer(n: int) -> None:
        outcomes[n] = store_instances(archive, [Offer(files[n], f"file {n}")])[0].status

    first = threading.Thread(target=offer, args=(0,))
    first.start()
    assert first_started.wait(10)
    others = [threading.Thread(target=offer, args=(n,)) for n in range(1, 5)]
    for thread in others:
        thread.start()
    for thread in [first, *others]:
        thread.join(timeout=30)
    assert outcomes == {n: Status.STORED for n in range(5)}
    assert batches[0] == 1 and sum(batches) == 5
    assert len(batches) < 5  # some of the four waiting callers shared a transaction
    assert _count(archive) == 5


def _write_rows(url: str, rounds: int, errors: Any) -> None:
    db = Database(url)
    try:
        for _ in range(rounds):
            with db.write() as conn:
                # Read, then write: a deferred transaction could not wait here.
                conn.exec_driver_sql("SELECT count(*) FROM studies").scalar()
                conn.exec_driver_sql("UPDATE studies SET number_of_series = number_of_series")
    except Exception as exc:
        errors.put(repr(exc))
    finally:
        db.dispose()


@pytest.mark.parametrize("backend", ["sqlite"])
def test_writers_in_several_processes_wait_for_each_other(archive: Archive) -> None:
    spawn = multiprocessing.get_context("spawn")
    errors = spawn.Queue()
    writers = [spawn.Process(target=_write_rows, args=(archive.db.url, 40, errors))
               for _ in range(3)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
    assert [w.exitcode for w in writers] == [0, 0, 0]
    assert errors.empty()


def test_port_probe_releases_its_slot_at_once(archive: Archive) -> None:
    # A connection closed before any A-ASSOCIATE-RQ (a health check) is done
    # as soon as it closes, not after the ACSE timeout: it no longer counts as
    # load when processes share out new associations.
    with scp(archive) as server:
        listener = server._server
        assert listener is not None
        for _ in range(3):
            socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
        deadline = time.monotonic() + 5
        while listener.serving and time.monotonic() < deadline:
            time.sleep(0.02)
        assert listener.serving == 0
        assert _send(server.port, [ct_dataset(size=64)]) == [Store.SUCCESS]
    assert _count(archive) == 1


def test_each_association_gets_its_own_contexts_sharing_only_the_uids() -> None:
    """pynetdicom deep-copies the SCP's contexts per association; the copy of
    ours is equal, owns its lists (negotiation may change them), and shares
    the immutable UIDs instead of validating thousands of them again."""
    ours = contexts.scp_contexts()
    theirs = copy.deepcopy(ours)
    assert len(theirs) == len(ours) > 100
    for a, b in zip(ours, theirs, strict=True):
        assert a is not b
        assert (a.abstract_syntax, a.transfer_syntax, a.scu_role, a.scp_role, a.context_id) == (
            b.abstract_syntax, b.transfer_syntax, b.scu_role, b.scp_role, b.context_id)
        assert a.transfer_syntax is not b.transfer_syntax
        assert all(x is y for x, y in zip(a.transfer_syntax, b.transfer_syntax, strict=True))
    theirs[1].transfer_syntax = [ExplicitVRLittleEndian]
    assert len(ours[1].transfer_syntax) == len(contexts.TRANSFER_SYNTAXES)


def _raw_association(port: int) -> socket.socket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    raw.sendall(association_request("LIGHTBOX", CTImageStorage))
    assert read_pdu(raw)[0] == 0x02  # A-ASSOCIATE-AC
    return raw


def _store_response(raw: socket.socket) -> Any:
    answer = read_pdu(raw)
    assert answer[0] == 0x04, answer[:16]
    return decode(BytesIO(answer[12:]), True, True)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("garbled", [b"1.2.3.4\xfd", b"1.2.abc."])
def test_a_request_uid_that_is_no_uid_is_refused_and_the_association_goes_on(
    archive: Archive, garbled: bytes
) -> None:
    """An Affected SOP Instance UID with a byte outside ASCII (streamed or not,
    it would go into the File Meta Information) or letters: a failure status
    naming it, nothing kept; the next C-STORE on the association is stored."""
    bad = ct_dataset(size=8, sop=generate_uid(prefix=ROOT))
    wire = _wire_store(bad, 16384)
    uid = bad.SOPInstanceUID.encode()
    # The command set names the instance first; the dataset keeps its own UID.
    wire = wire.replace(uid, (garbled + b"\x00" * len(uid))[:len(uid)], 1)
    good = ct_dataset(size=8, sop=generate_uid(prefix=ROOT))
    with scp(archive) as server, _raw_association(server.port) as raw:
        raw.sendall(wire)
        refused = _store_response(raw)
        assert refused.Status == Store.CANNOT_UNDERSTAND
        assert "is not a valid UID" in refused.ErrorComment
        raw.sendall(_wire_store(good, 16384))
        assert _store_response(raw).Status == Store.SUCCESS
        raw.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-RELEASE-RQ
        assert read_pdu(raw)[0] == 0x06
    with archive.db.read() as conn:
        kept = conn.execute(select(instances.c.sop_instance_uid)).scalars().all()
    assert kept == [good.SOPInstanceUID]
    assert not archive.blobs.staged()


def test_a_command_set_that_cannot_be_decoded_aborts_quietly(
    archive: Archive, caplog: pytest.LogCaptureFixture
) -> None:
    """A C-STORE-RQ without its Command Data Set Type: pynetdicom's decoder
    raises on it. The association is aborted (an invalid PDU) with a warning,
    not a traceback from a dying thread, and the SCP serves the next one."""
    command = BytesIO()
    request = Dataset()
    request.CommandGroupLength = 0
    request.AffectedSOPClassUID = CTImageStorage
    request.CommandField = C_STORE_RQ_FIELD
    request.MessageID = 1
    request.Priority = 0
    request.AffectedSOPInstanceUID = generate_uid(prefix=ROOT)
    command.write(encode(request, True, True))
    data = command.getvalue()
    item = struct.pack(">LBB", len(data) + 2, 1, 0x03) + data
    pdu = struct.pack(">BxL", 0x04, len(item)) + item
    with caplog.at_level(logging.WARNING), scp(archive) as server:
        with _raw_association(server.port) as raw:
            raw.sendall(pdu)
            assert read_pdu(raw)[0] == 0x07  # A-ABORT
        dcmtk("echoscu", "-aec", "LIGHTBOX", "127.0.0.1", str(server.port))
    assert any("unreadable P-DATA" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.exc_info]
    assert _count(archive) == 0
