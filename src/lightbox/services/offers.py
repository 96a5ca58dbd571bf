"""The vocabulary of the one ingest path: what is offered for storage, what
becomes of it on the way (a durable blob, a checked header), and the outcome
each offer gets. ``ingest`` prepares offers; ``indexing`` writes them to the
index."""

from __future__ import annotations

import enum
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from lightbox.dicom.instance import InstanceRecord
from lightbox.errors import InvalidInstance
from lightbox.storage.blobs import BlobStore


class Status(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


class FailureReason(enum.IntEnum):
    """Failure reasons of PS3.4 Annex GG / PS3.18 STOW-RS responses."""

    PROCESSING_FAILURE = 0x0110
    NOT_AUTHORIZED = 0x0124
    OUT_OF_RESOURCES = 0xA700
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    STUDY_UID_MISMATCH = 0xC409


@dataclass(frozen=True)
class Outcome:
    """What happened to one object offered for storage."""

    status: Status
    source: str
    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    reason: str | None = None
    failure: FailureReason | None = None


Header = InstanceRecord | InvalidInstance | None


@dataclass(frozen=True)
class Offer:
    """A file offered for storage. ``staged`` files already live in the blob
    store's staging folder and are moved, not copied; ``synced`` says whether
    their bytes were fsynced already (if not, ingest does it). ``header`` is
    the file's header when it was read ahead (see ``readahead``): the record,
    or why the file is refused; None means ingest reads it. It may still be
    on its way (a future): ingest then takes it if it has come by the time
    the file is checked, and reads the header itself if not."""

    path: Path
    source: str
    staged: bool = False
    synced: bool = True
    header: Header | Future[Header] = None

    def header_if_read(self) -> Header:
        """The header read ahead, if it has come (None: ingest reads it)."""
        if isinstance(self.header, Future):
            return self.header.result() if self.header.done() else None
        return self.header


@dataclass(frozen=True)
class Blob:
    """A durable blob holding an offer's bytes, not yet (or never) indexed."""

    store: BlobStore
    key: str

    def delete(self) -> None:
        self.store.delete(self.key)


@dataclass(frozen=True)
class Prepared:
    """An offer checked, waiting for ``commit``: ``record`` (and its ``blob``)
    when it is to be stored, ``rejected`` when it was refused. ``durable`` is
    the blob's fsync when it may still be under way: the index transaction
    does its work meanwhile and commits only once it has succeeded."""

    offer: Offer
    record: InstanceRecord | None
    rejected: Outcome | None
    blob: Blob | None = None
    durable: Future[str] | None = None


def outcome(status: Status, offer: Offer, record: InstanceRecord, reason: str | None = None,
            failure: FailureReason | None = None) -> Outcome:
    """The Outcome of ``offer``, naming the instance its header described."""
    return Outcome(
        status,
        offer.source,
        sop_instance_uid=record.sop_instance_uid,
        sop_class_uid=record.sop_class_uid,
        study_instance_uid=record.study_instance_uid,
        series_instance_uid=record.series_instance_uid,
        reason=reason,
        failure=failure,
    )
