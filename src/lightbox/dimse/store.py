"""Receiving one C-STORE (as SCP, or as a C-GET requestor) into the one ingest path.

On the SCP the dataset arrives straight in the blob store's staging folder
(``streaming``), behind the preamble and File Meta Information naming the
negotiated transfer syntax that ``open_staged`` wrote first. On a C-GET
requestor pynetdicom has written it to a temporary file (chunked receive),
and it is copied into staging the same way. Either file is offered to the
ingest service like every other source; its bytes are fsynced there while
the header is parsed. The peer hears Success only once the instance and its
index row are durable.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
from pathlib import Path
from typing import cast

from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset
from pynetdicom.events import Event

from lightbox.archive import Archive
from lightbox.dicom import uids
from lightbox.dimse import contexts, streaming
from lightbox.dimse.status import STORE_FAILURES, Store, status_dataset
from lightbox.errors import BadRequest
from lightbox.services import folders
from lightbox.services.auth import Principal
from lightbox.services.ingest import Offer, Outcome, Prepared, Status, commit, discard, prepare

log = logging.getLogger("lightbox.dimse")

PREAMBLE = bytes(128) + b"DICM"


class _Mismatch(Exception):
    """The dataset names another SOP Class or Instance than the C-STORE request."""


def receive(archive: Archive, event: Event, *, calling_ae: str, source: str,
            principal: Principal | None = None) -> tuple[Dataset, Outcome | None]:
    """Store the dataset of a C-STORE request; the status to answer and the outcome.

    With the ``principal`` of a node acting as a member, the member's rules
    apply: no adding to studies they may not add to (0x0124), and new studies
    land in their inbox. Never raises: every failure becomes a failure status
    with an error comment. The staging file is consumed whatever happens.
    """
    request = cast(C_STORE, event.request)
    sop_instance = str(request.AffectedSOPInstanceUID or "")
    refused = _request_uid_problem(request)
    if refused is not None:
        streamed = streaming.staged(request)
        if streamed is not None and streamed.path is not None:
            streamed.path.unlink(missing_ok=True)
        log.info("C-STORE from %s refused: %s", source, refused)
        return status_dataset(Store.CANNOT_UNDERSTAND, refused), None
    staged: Path | None = None
    prepared: list[Prepared] = []  # blobs made, to remove if it fails before the commit
    try:
        staged = _staged(archive, event, calling_ae)
        offer = Offer(staged, source, staged=True, synced=False)
        prepared = prepare(archive, [offer], None)
        staged = None  # ingest owns it now
        _check_identity(prepared[0], request)
        if principal is not None:
            prepared = folders.screen_uploads(archive, principal, prepared)
        committing, prepared = prepared, []
        outcome = commit(archive, committing)[0]
        if principal is not None and outcome.status is not Status.REJECTED:
            folders.file_uploads(archive, principal, [outcome.study_instance_uid or ""])
        elif principal is not None and outcome.study_instance_uid:
            folders.file_uploads(archive, principal, [], offered=[outcome.study_instance_uid])
    except _Mismatch as exc:
        return status_dataset(Store.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, str(exc)), None
    except OSError as exc:
        log.error("C-STORE of %s from %s: cannot stage: %s", sop_instance, source, exc)
        return status_dataset(Store.OUT_OF_RESOURCES, "storage is not writable"), None
    except Exception:
        log.exception("C-STORE of %s from %s failed", sop_instance, source)
        return status_dataset(Store.PROCESSING_FAILURE, "internal error while storing"), None
    finally:
        if staged is not None:
            staged.unlink(missing_ok=True)
        discard(prepared)  # what was not handed to the commit
    return _status(outcome), outcome


def open_staged(archive: Archive, request: streaming.StoreRequest) -> tuple[int, Path]:
    """A staging file for a streamed C-STORE dataset: the preamble and our File
    Meta Information written, the descriptor open for the dataset's bytes."""
    fd, path = archive.blobs.new_staging_file()
    try:
        head = PREAMBLE + file_meta(request)
        os.write(fd, head)  # one small write to a fresh file: all of it or an error
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    return fd, path


def _request_uid_problem(request: C_STORE) -> str | None:
    """Why the request's own UIDs cannot name a stored instance, if they cannot.
    (They go into the File Meta Information; the dataset must repeat them.)"""
    for what, value in (("SOP Class", request.AffectedSOPClassUID),
                        ("SOP Instance", request.AffectedSOPInstanceUID)):
        if value:
            try:
                uids.require_uid(str(value), f"Affected {what} UID")
            except BadRequest as exc:
                return exc.message
    return None


def _staged(archive: Archive, event: Event, calling_ae: str) -> Path:
    """The staging file holding the request's dataset as a Part 10 file."""
    streamed = streaming.staged(event.request)
    if streamed is None:
        return _stage(archive, event.dataset_path, event, calling_ae)
    if streamed.error is not None or streamed.path is None:
        raise streamed.error or OSError("dataset not staged")
    return streamed.path


def _status(outcome: Outcome) -> Dataset:
    if outcome.status in (Status.STORED, Status.DUPLICATE):
        return status_dataset(Store.SUCCESS)
    code = STORE_FAILURES.get(outcome.failure, Store.CANNOT_UNDERSTAND) if (
        outcome.failure is not None
    ) else Store.CANNOT_UNDERSTAND
    log.info("C-STORE from %s rejected (0x%04X): %s", outcome.source, code, outcome.reason)
    return status_dataset(code, outcome.reason or "rejected")


def _check_identity(prepared: Prepared, request: C_STORE) -> None:
    """Refuse a dataset whose SOP Class / Instance UIDs contradict the request
    (PS3.4 B.2.3: "Data Set does not match SOP Class"). Unreadable headers are
    left for ingest's validation to explain."""
    record = prepared.record
    if record is None:
        return
    sop_class = str(request.AffectedSOPClassUID or "")
    sop_instance = str(request.AffectedSOPInstanceUID or "")
    if sop_class and record.sop_class_uid != sop_class:
        raise _Mismatch(f"SOP Class UID {record.sop_class_uid} is not the requested {sop_class}")
    if sop_instance and record.sop_instance_uid != sop_instance:
        raise _Mismatch("SOP Instance UID differs from the request's")


def file_meta(request: streaming.StoreRequest) -> bytes:
    """The encoded File Meta Information group (PS3.10 7.1) for a received dataset."""
    elements = [
        _element(0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, b"UI", _uid(request.sop_class_uid)),
        _element(0x0003, b"UI", _uid(request.sop_instance_uid)),
        _element(0x0010, b"UI", _uid(request.transfer_syntax)),
        _element(0x0012, b"UI", _uid(contexts.IMPLEMENTATION_CLASS_UID)),
        _element(0x0013, b"SH", _text(contexts.IMPLEMENTATION_VERSION_NAME)),
    ]
    if request.calling_ae:
        elements.append(_element(0x0016, b"AE", _text(request.calling_ae)))
    body = b"".join(elements)
    return _element(0x0000, b"UL", struct.pack("<L", len(body))) + body


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element of group 0002."""
    if vr == b"OB":
        return struct.pack("<HH2s2xL", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    raw = value.encode("ascii", "replace")[:64]
    return raw + b" " if len(raw) % 2 else raw


def _stage(archive: Archive, received: Path, event: Event, calling_ae: str) -> Path:
    """Preamble, our File Meta Information and the bytes pynetdicom received."""
    request = cast(C_STORE, event.request)
    _meta, offset = split_dataset(received)
    fd, target = open_staged(archive, streaming.StoreRequest(
        sop_class_uid=str(request.AffectedSOPClassUID or ""),
        sop_instance_uid=str(request.AffectedSOPInstanceUID or ""),
        transfer_syntax=str(event.context.transfer_syntax),
        calling_ae=calling_ae,
    ))
    try:
        with os.fdopen(fd, "wb") as out, open(received, "rb") as src:
            src.seek(offset)
            shutil.copyfileobj(src, out, 1024 * 1024)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return target
