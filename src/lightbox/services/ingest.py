"""The one ingest path: every source (STOW-RS, C-STORE, import, upload) ends here.

Per batch: parse and validate each header, move the file under a fresh key
(fsync of data and directory), then one index transaction with a savepoint
per instance. If indexing fails, the blob is removed. An outcome of STORED
means both the bytes and the index row are durable.
"""

from __future__ import annotations

import enum
import logging
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from lightbox.archive import Archive
from lightbox.dicom.instance import InstanceRecord, MissingOrInvalidUID, read_instance
from lightbox.errors import Conflict, InvalidInstance
from lightbox.index import instances as index
from lightbox.index.schema import instances as instances_table
from lightbox.storage.blobs import fsync_file

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class Offer:
    """A file offered for storage. ``staged`` files already live in the blob
    store's staging folder and are moved, not copied; ``synced`` says whether
    their bytes were fsynced already (if not, ingest does it)."""

    path: Path
    source: str
    staged: bool = False
    synced: bool = True


# Headers are parsed while other files' fsyncs are in flight: the waits overlap.
_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ingest")


@dataclass(frozen=True)
class Prepared:
    """An offer checked and made durable, waiting for ``commit``: ``record``
    when it is to be stored, ``rejected`` when it was refused."""

    offer: Offer
    record: InstanceRecord | None
    rejected: Outcome | None


def store_instances(
    archive: Archive, offers: Sequence[Offer], *, expected_study: str | None = None
) -> list[Outcome]:
    """Store a batch of files; return one Outcome per offer, in order.

    Staged files are consumed (moved or deleted) whatever the outcome.
    """
    return commit(archive, prepare(archive, offers, expected_study))


def discard(prepared: Sequence[Prepared]) -> None:
    """Forget prepared offers that will not be committed (their files go)."""
    for item in prepared:
        _discard(item.offer)


def commit(archive: Archive, prepared: Sequence[Prepared]) -> list[Outcome]:
    """Store what ``prepare`` accepted; one Outcome per item, in order."""
    offers = [p.offer for p in prepared]
    outcomes: list[Outcome | None] = [p.rejected for p in prepared]
    accepted = [(i, p.record) for i, p in enumerate(prepared) if p.record is not None]
    duplicates = _existing(archive, [r.sop_instance_uid for _, r in accepted])
    to_write = []
    for i, record in accepted:
        if record.sop_instance_uid in duplicates and not archive.settings.overwrite:
            outcomes[i] = _outcome(Status.DUPLICATE, offers[i], record)
            _discard(offers[i])
        else:
            to_write.append((i, record, offers[i].path))
    for i, outcome in _write(archive, offers, to_write):
        outcomes[i] = outcome
    return [o for o in outcomes if o is not None]


def prepare(
    archive: Archive, offers: Sequence[Offer], expected_study: str | None
) -> list[Prepared]:
    """Check each offer and make its bytes durable in the staging folder.

    The fsyncs (and copies into staging) run on the ingest pool while this
    thread parses the headers one after the other: the disk waits overlap with
    the parsing, and only one thread does Python work (several parsing at once
    only fight over the interpreter lock). Nothing is stored until ``commit``.
    """
    offers = [_with_preamble(archive, offer) for offer in offers]
    staging = [_pool.submit(_stage, archive, offer) for offer in offers]
    return [
        _prepared(archive, offer, staged, expected_study)
        for offer, staged in zip(offers, staging, strict=True)
    ]


def _prepared(
    archive: Archive, offer: Offer, staged: Future[Offer], expected_study: str | None
) -> Prepared:
    try:
        record = _validate(archive, offer, expected_study)
    except InvalidInstance as exc:
        record, rejection = None, _rejected(offer, exc)
    try:
        durable = staged.result()
    except OSError as exc:
        log.error("cannot stage %s: %s", offer.source, exc)
        _discard(offer)
        if record is None:
            return Prepared(offer, None, rejection)
        failure = _outcome(Status.REJECTED, offer, record, "storage is not writable",
                           FailureReason.OUT_OF_RESOURCES)
        return Prepared(offer, None, failure)
    if record is None:
        _discard(durable)
        return Prepared(durable, None, rejection)
    return Prepared(durable, record, None)


PREAMBLE = bytes(128) + b"DICM"


def _with_preamble(archive: Archive, offer: Offer) -> Offer:
    """Add the Part 10 preamble to a file that starts directly with its File Meta
    group (as some clients write it), so that what we store and serve is a
    conformant file. Anything else is left for validation to judge."""
    try:
        with open(offer.path, "rb") as fh:
            head = fh.read(132)
            if head[128:132] == b"DICM" or not head.startswith(b"\x02\x00"):
                return offer
            fd, target = archive.blobs.new_staging_file()
            with os.fdopen(fd, "wb") as out:
                out.write(PREAMBLE)
                fh.seek(0)
                shutil.copyfileobj(fh, out, 1024 * 1024)
    except OSError:
        return offer
    _discard(offer)
    return Offer(target, offer.source, staged=True, synced=False)


def _validate(archive: Archive, offer: Offer, expected_study: str | None) -> InstanceRecord:
    try:
        if not offer.path.is_file():
            raise InvalidInstance("not a regular file")
        size = os.path.getsize(offer.path)
        if size > archive.settings.max_instance_bytes:
            raise InvalidInstance(f"object of {size} bytes exceeds the limit")
        record = read_instance(offer.path)
    except OSError as exc:
        # One unreadable offer (gone, no permission) must not sink the batch.
        raise InvalidInstance(f"cannot read the file: {exc.strerror or exc}") from exc
    if expected_study is not None and record.study_instance_uid != expected_study:
        raise _StudyMismatch(
            f"instance belongs to study {record.study_instance_uid}, not {expected_study}",
            record,
        )
    return record


class _StudyMismatch(InvalidInstance):
    """A valid instance of another study than the one the caller named."""

    def __init__(self, message: str, record: InstanceRecord) -> None:
        super().__init__(message)
        self.record = record


def _rejected(offer: Offer, exc: InvalidInstance) -> Outcome:
    if isinstance(exc, _StudyMismatch):
        # The header was read: the response can name the refused SOP Instance.
        return _outcome(Status.REJECTED, offer, exc.record, exc.message,
                        FailureReason.STUDY_UID_MISMATCH)
    failure = FailureReason.CANNOT_UNDERSTAND
    if isinstance(exc, MissingOrInvalidUID):
        failure = FailureReason.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    return Outcome(Status.REJECTED, offer.source, reason=exc.message, failure=failure)


def _outcome(status: Status, offer: Offer, record: InstanceRecord, reason: str | None = None,
             failure: FailureReason | None = None) -> Outcome:
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


def _discard(offer: Offer) -> None:
    if offer.staged:
        offer.path.unlink(missing_ok=True)


def _existing(archive: Archive, sop_uids: list[str]) -> set[str]:
    if not sop_uids:
        return set()
    col = instances_table.c.sop_instance_uid
    with archive.db.read() as conn:
        return set(conn.execute(select(col).where(col.in_(sop_uids))).scalars())


def _stage(archive: Archive, offer: Offer) -> Offer:
    """The offer as a durable file inside the staging folder."""
    if offer.staged:
        if not offer.synced:
            fsync_file(offer.path)
        return Offer(offer.path, offer.source, staged=True)
    fd, target = archive.blobs.new_staging_file()
    try:
        with os.fdopen(fd, "wb") as out, open(offer.path, "rb") as src:
            shutil.copyfileobj(src, out, 1024 * 1024)
        fsync_file(target)
    except OSError:
        target.unlink(missing_ok=True)
        raise
    return Offer(target, offer.source, staged=True)


def _write(
    archive: Archive, offers: Sequence[Offer], items: list[tuple[int, InstanceRecord, Path]]
) -> list[tuple[int, Outcome]]:
    if not items:
        return []
    keys: list[tuple[int, InstanceRecord, str]] = []
    results: list[tuple[int, Outcome]] = []
    for i, record, _path in items:
        try:
            key = archive.blobs.put_file(offers[i].path, sync_dir=False)
            keys.append((i, record, key))
        except OSError as exc:
            log.error("cannot write blob for %s: %s", offers[i].source, exc)
            _discard(offers[i])
            results.append((i, _outcome(Status.REJECTED, offers[i], record,
                                        "storage is not writable",
                                        FailureReason.OUT_OF_RESOURCES)))
    archive.blobs.sync(k for _, _, k in keys)
    try:
        indexed, unreferenced = _index(archive, offers, keys)
    except SQLAlchemyError as exc:
        log.error("index transaction failed: %s", exc)
        for _, _, key in keys:
            archive.blobs.delete(key)
        return results + [
            (i, _outcome(Status.REJECTED, offers[i], r, "index is not writable",
                         FailureReason.OUT_OF_RESOURCES))
            for i, r, _ in keys
        ]
    for key in unreferenced:
        archive.blobs.delete(key)
    return results + indexed


def _lock_order(item: tuple[int, InstanceRecord, str]) -> tuple[str, str, str, int]:
    """Index a batch patient by patient, study by study, series by series, so that
    concurrent transactions take row locks in one order and cannot deadlock
    (a batch with studies A, B next to one with B, A would). Ties keep the
    offered order, so the first of two copies in a batch is the one stored."""
    i, record, _key = item
    patient = index.patient_identity(record.values)
    return patient, record.study_instance_uid, record.series_instance_uid, i


def _index(
    archive: Archive, offers: Sequence[Offer], keys: list[tuple[int, InstanceRecord, str]]
) -> tuple[list[tuple[int, Outcome]], list[str]]:
    results: list[tuple[int, Outcome]] = []
    unreferenced: list[str] = []
    touched: set[int] = set()
    known: dict[str, tuple[int, int]] = {}
    with archive.db.write() as conn:
        for i, record, key in sorted(keys, key=_lock_order):
            savepoint = conn.begin_nested()
            try:
                stored, freed, study_pk = index.store(
                    archive.db, conn, record, key, overwrite=archive.settings.overwrite,
                    known=known,
                )
                savepoint.commit()
            except Conflict as exc:
                savepoint.rollback()
                known.clear()  # rows it remembered may have been rolled back
                unreferenced.append(key)
                results.append((i, _outcome(Status.REJECTED, offers[i], record, exc.message,
                                            FailureReason.PROCESSING_FAILURE)))
                continue
            if freed is not None:
                unreferenced.append(freed)
            if study_pk is not None:
                touched.add(study_pk)
            status = Status.DUPLICATE if stored is index.Stored.DUPLICATE else Status.STORED
            results.append((i, _outcome(status, offers[i], record)))
        index.refresh_studies(conn, touched)
    return results, unreferenced
