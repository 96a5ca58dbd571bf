"""Receiving one C-STORE (as SCP, or as a C-GET requestor) into the one ingest path.

pynetdicom has already written the dataset to a temporary file (chunked
receive). Here it becomes a Part 10 file in the blob store's staging folder,
with File Meta Information naming the negotiated transfer syntax, is fsynced,
and is offered to ``ingest.store_instances`` like every other source. The
peer hears Success only once the instance and its index row are durable.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import cast

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_partial
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset
from pynetdicom.events import Event

from lightbox.archive import Archive
from lightbox.dimse import contexts
from lightbox.dimse.status import STORE_FAILURES, Store, status_dataset
from lightbox.services.ingest import Offer, Outcome, Status, store_instances
from lightbox.storage.blobs import fsync_file

log = logging.getLogger("lightbox.dimse")

PREAMBLE = bytes(128) + b"DICM"
_SOP_INSTANCE_UID = 0x00080018


class _Mismatch(Exception):
    """The dataset names another SOP Class or Instance than the C-STORE request."""


def receive(archive: Archive, event: Event, *, calling_ae: str, source: str) -> tuple[
    Dataset, Outcome | None
]:
    """Store the dataset of a C-STORE request; the status to answer and the outcome.

    Never raises: every failure becomes a failure status with an error comment.
    """
    request = cast(C_STORE, event.request)
    sop_class = str(request.AffectedSOPClassUID or "")
    sop_instance = str(request.AffectedSOPInstanceUID or "")
    staged: Path | None = None
    try:
        received = event.dataset_path
        _check_identity(received, sop_class, sop_instance)
        staged = _stage(archive, received, event, calling_ae)
        outcome = store_instances(archive, [Offer(staged, source, staged=True)])[0]
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
            # Ingest consumes staged files; this only catches an exception in between.
            staged.unlink(missing_ok=True)
    return _status(outcome), outcome


def _status(outcome: Outcome) -> Dataset:
    if outcome.status in (Status.STORED, Status.DUPLICATE):
        return status_dataset(Store.SUCCESS)
    code = STORE_FAILURES.get(outcome.failure, Store.CANNOT_UNDERSTAND) if (
        outcome.failure is not None
    ) else Store.CANNOT_UNDERSTAND
    log.info("C-STORE from %s rejected (0x%04X): %s", outcome.source, code, outcome.reason)
    return status_dataset(code, outcome.reason or "rejected")


def _after_sop_instance_uid(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    return int(tag) > _SOP_INSTANCE_UID


def _check_identity(path: Path, sop_class: str, sop_instance: str) -> None:
    """Refuse a dataset whose SOP Class / Instance UIDs contradict the request
    (PS3.4 B.2.3: "Data Set does not match SOP Class"). Unreadable headers are
    left for ingest's validation to explain."""
    try:
        with open(path, "rb") as fp:
            ds = read_partial(fp, stop_when=_after_sop_instance_uid)
            found_class = str(ds.get("SOPClassUID", "") or "")
            found_instance = str(ds.get("SOPInstanceUID", "") or "")
    except Exception:
        return
    if found_class and sop_class and found_class != sop_class:
        raise _Mismatch(f"SOP Class UID {found_class} is not the requested {sop_class}")
    if found_instance and sop_instance and found_instance != sop_instance:
        raise _Mismatch("SOP Instance UID differs from the request's")


def _file_meta(event: Event, calling_ae: str) -> bytes:
    request = cast(C_STORE, event.request)
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(str(request.AffectedSOPClassUID))
    meta.MediaStorageSOPInstanceUID = UID(str(request.AffectedSOPInstanceUID))
    meta.TransferSyntaxUID = UID(str(event.context.transfer_syntax))
    meta.ImplementationClassUID = UID(contexts.IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = contexts.IMPLEMENTATION_VERSION_NAME
    if calling_ae:
        meta.SourceApplicationEntityTitle = calling_ae
    buffer = DicomBytesIO()
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return buffer.getvalue()


def _stage(archive: Archive, received: Path, event: Event, calling_ae: str) -> Path:
    """Preamble, our File Meta Information and the received dataset bytes, fsynced."""
    _meta, offset = split_dataset(received)
    fd, target = archive.blobs.new_staging_file()
    try:
        with os.fdopen(fd, "wb") as out, open(received, "rb") as src:
            out.write(PREAMBLE)
            out.write(_file_meta(event, calling_ae))
            src.seek(offset)
            shutil.copyfileobj(src, out, 1024 * 1024)
        fsync_file(target)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return target
