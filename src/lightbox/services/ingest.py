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
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from lightbox.archive import Archive
from lightbox.dicom.instance import InstanceRecord, read_instance
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
    """A file offered for storage. ``staged`` files already live, fsynced, in
    the blob store's staging folder and are moved, not copied."""

    path: Path
    source: str
    staged: bool = False


def store_instances(
    archive: Archive, offers: Sequence[Offer], *, expected_study: str | None = None
) -> list[Outcome]:
    """Store a batch of files; return one Outcome per offer, in order.

    Staged files are consumed (moved or deleted) whatever the outcome.
    """
    outcomes: list[Outcome | None] = [None] * len(offers)
    accepted: list[tuple[int, InstanceRecord, Path]] = []
    offers = [_with_preamble(archive, offer) for offer in offers]
    for i, offer in enumerate(offers):
        try:
            record = _validate(archive, offer, expected_study)
            accepted.append((i, record, offer.path))
        except InvalidInstance as exc:
            outcomes[i] = _rejected(offer, exc)
            _discard(offer)
    duplicates = _existing(archive, [r.sop_instance_uid for _, r, _ in accepted])
    to_write = []
    for i, record, path in accepted:
        if record.sop_instance_uid in duplicates and not archive.settings.overwrite:
            outcomes[i] = _outcome(Status.DUPLICATE, offers[i], record)
            _discard(offers[i])
        else:
            to_write.append((i, record, path))
    for i, outcome in _write(archive, offers, to_write):
        outcomes[i] = outcome
    return [o for o in outcomes if o is not None]


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
    fsync_file(target)
    _discard(offer)
    return Offer(target, offer.source, staged=True)


def _validate(archive: Archive, offer: Offer, expected_study: str | None) -> InstanceRecord:
    size = os.path.getsize(offer.path)
    if size > archive.settings.max_instance_bytes:
        raise InvalidInstance(f"object of {size} bytes exceeds the limit")
    record = read_instance(offer.path)
    if expected_study is not None and record.study_instance_uid != expected_study:
        raise _StudyMismatch(
            f"instance belongs to study {record.study_instance_uid}, not {expected_study}"
        )
    return record


class _StudyMismatch(InvalidInstance):
    pass


def _rejected(offer: Offer, exc: InvalidInstance) -> Outcome:
    failure = FailureReason.CANNOT_UNDERSTAND
    if isinstance(exc, _StudyMismatch):
        failure = FailureReason.STUDY_UID_MISMATCH
    elif "UID" in exc.message or "missing" in exc.message:
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


def _stage(archive: Archive, offer: Offer) -> Path:
    """A durable copy of the offer inside the staging folder."""
    if offer.staged:
        return offer.path
    fd, target = archive.blobs.new_staging_file()
    with os.fdopen(fd, "wb") as out, open(offer.path, "rb") as src:
        shutil.copyfileobj(src, out, 1024 * 1024)
    fsync_file(target)
    return target


def _write(
    archive: Archive, offers: Sequence[Offer], items: list[tuple[int, InstanceRecord, Path]]
) -> list[tuple[int, Outcome]]:
    if not items:
        return []
    keys: list[tuple[int, InstanceRecord, str]] = []
    results: list[tuple[int, Outcome]] = []
    for i, record, _path in items:
        try:
            keys.append((i, record, archive.blobs.put_file(_stage(archive, offers[i]), sync_dir=False)))
        except OSError as exc:
            log.error("cannot write blob for %s: %s", offers[i].source, exc)
            _discard(offers[i])
            results.append((i, _outcome(Status.REJECTED, offers[i], record, "storage is not writable",
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


def _index(
    archive: Archive, offers: Sequence[Offer], keys: list[tuple[int, InstanceRecord, str]]
) -> tuple[list[tuple[int, Outcome]], list[str]]:
    results: list[tuple[int, Outcome]] = []
    unreferenced: list[str] = []
    with archive.db.write() as conn:
        for i, record, key in keys:
            savepoint = conn.begin_nested()
            try:
                stored, freed = index.store(
                    archive.db, conn, record, key, overwrite=archive.settings.overwrite
                )
                savepoint.commit()
            except Conflict as exc:
                savepoint.rollback()
                unreferenced.append(key)
                results.append((i, _outcome(Status.REJECTED, offers[i], record, exc.message,
                                            FailureReason.PROCESSING_FAILURE)))
                continue
            if freed is not None:
                unreferenced.append(freed)
            status = Status.DUPLICATE if stored is index.Stored.DUPLICATE else Status.STORED
            results.append((i, _outcome(status, offers[i], record)))
    return results, unreferenced
