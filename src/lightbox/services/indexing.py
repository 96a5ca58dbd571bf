"""The index step of the one ingest path: prepared offers (each a checked
header and a blob whose fsync may still be under way) written to the index.

One transaction per batch (see ``_transaction``), which commits only once
the blobs are durable; blobs that end up unreferenced (copies, refusals) are
removed, and so are all of a batch's blobs if the transaction fails. The
transactions of callers that arrive while another one is being written
(parallel C-STORE associations, STOW requests) are merged into the next one:
one commit, one fsync, for all of them ("group commit").
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from lightbox.archive import Archive
from lightbox.dicom.instance import InstanceRecord
from lightbox.errors import Conflict
from lightbox.index import instances as index
from lightbox.index.db import Database
from lightbox.services.offers import FailureReason, Outcome, Prepared, Status, outcome

log = logging.getLogger("lightbox.services.ingest")


def write(archive: Archive, items: Sequence[Prepared]) -> list[Outcome]:
    """Index ``items`` (each with a record and a blob), together with those of
    other callers arriving meanwhile; return once they are committed, with one
    Outcome per item, in order."""
    return _group(archive.db).run(archive, items)


def _lock_order(entry: tuple[int, Prepared]) -> tuple[str, str, str, int]:
    """Index a batch patient by patient, study by study, series by series, so that
    concurrent transactions take row locks in one order and cannot deadlock
    (a batch with studies A, B next to one with B, A would). Ties keep the
    offered order, so the first of two copies in a batch is the one stored."""
    i, item = entry
    record = item.record
    assert record is not None
    patient = index.patient_identity(record.values)
    return patient, record.study_instance_uid, record.series_instance_uid, i


def _index(archive: Archive, items: Sequence[Prepared]) -> list[Outcome]:
    """One index transaction for ``items`` (each with a record and a blob);
    blobs that end up unreferenced are deleted. One Outcome per item, in order."""
    try:
        try:
            looked_up = _look_up(archive, items)
            outcomes, unreferenced = _transaction(archive, items, looked_up=looked_up)
        except IntegrityError:
            # Another writer stored one of these instances (or removed a series)
            # after the look-up: again, looking up inside the transaction.
            outcomes, unreferenced = _transaction(archive, items)
        except _NotDurable as exc:
            return _without(archive, items, exc.failed)
    except SQLAlchemyError as exc:
        log.error("index transaction failed: %s", exc)
        for item in items:
            assert item.blob is not None and item.record is not None
            item.blob.delete()
        return [
            outcome(Status.REJECTED, item.offer, item.record, "index is not writable",
                     FailureReason.OUT_OF_RESOURCES)
            for item in items if item.record is not None
        ]
    for key in unreferenced:
        archive.blobs.delete(key)
    return outcomes


class _NotDurable(Exception):
    """Blobs whose fsync failed: the transaction that would index them is undone."""

    def __init__(self, failed: set[int]) -> None:
        super().__init__(f"{len(failed)} blob(s) could not be made durable")
        self.failed = failed


def _wait_durable(items: Sequence[Prepared]) -> None:
    """Wait for the fsyncs still under way; _NotDurable names those that failed."""
    failed = set()
    for i, item in enumerate(items):
        if item.durable is not None:
            try:
                item.durable.result()
            except OSError as exc:
                log.error("cannot store %s: %s", item.offer.source, exc)
                failed.add(i)
    if failed:
        raise _NotDurable(failed)


def _without(archive: Archive, items: Sequence[Prepared], failed: set[int]) -> list[Outcome]:
    """Index the items whose blobs are durable; the others are refused."""
    rest = [item for i, item in enumerate(items) if i not in failed]
    indexed = iter(_index(archive, rest) if rest else [])
    outcomes = []
    for i, item in enumerate(items):
        if i in failed:
            assert item.blob is not None and item.record is not None
            item.blob.delete()
            outcomes.append(outcome(Status.REJECTED, item.offer, item.record,
                                     "storage is not writable", FailureReason.OUT_OF_RESOURCES))
        else:
            outcomes.append(next(indexed))
    return outcomes


_LookUp = tuple[set[str], dict[str, tuple[int, int, str]]]


def _look_up(archive: Archive, items: Sequence[Prepared]) -> _LookUp | None:
    """Which of the items' instances and series are indexed already, read
    before the write transaction so that SQLite's write lock is held for
    writing only. None with ``overwrite``, which looks up each instance as it
    goes, and on PostgreSQL, where writers lock only the rows they write: the
    write transaction looks them up itself, saving a connection and a
    transaction of its own (each a round trip to the server, or three)."""
    if archive.settings.overwrite or not archive.db.is_sqlite:
        return None
    with archive.db.read() as conn:
        return _stored_and_filed(conn, _records(items))


def _records(items: Sequence[Prepared]) -> list[InstanceRecord]:
    return [item.record for item in items if item.record is not None]


def _stored_and_filed(conn: Connection, records: Sequence[InstanceRecord]) -> _LookUp:
    return index.look_up(conn, [r.sop_instance_uid for r in records],
                         [r.series_instance_uid for r in records])


def _transaction(
    archive: Archive, items: Sequence[Prepared], looked_up: _LookUp | None = None,
) -> tuple[list[Outcome], list[str]]:
    """The index transaction. It starts from which instances are indexed
    already (copies) and which of the batch's series are: ``looked_up``
    before the write lock was taken, or else looked up inside. An instance of a
    series in the index (or made by the batch's earlier instances) is a plain
    new row: those are inserted together at the end, with one statement, and
    counted in their study with one increment. Anything else (a new series or
    study, a copy to replace) goes through ``index.store`` in a savepoint of
    its own, so that a conflict refuses that instance alone."""
    results: list[Outcome | None] = [None] * len(items)
    unreferenced: list[str] = []
    refresh: set[int] = set()  # studies that gained series: counted again
    added: Counter[int] = Counter()  # studies that only gained instances
    known: dict[tuple[str, str], tuple[int, int]] = {}
    overwrite = archive.settings.overwrite
    rows: list[dict[str, Any]] = []
    now = datetime.now(UTC)
    with archive.db.write() as conn:
        taken: set[str] = set()
        filed: dict[str, tuple[int, int, str]] = {}
        if looked_up is not None:
            taken, filed = looked_up
        elif not overwrite:
            taken, filed = _stored_and_filed(conn, _records(items))
        for i, item in sorted(enumerate(items), key=_lock_order):
            record, blob = item.record, item.blob
            assert record is not None and blob is not None
            if not overwrite and record.sop_instance_uid in taken:
                unreferenced.append(blob.key)
                results[i] = outcome(Status.DUPLICATE, item.offer, record)
                continue
            place = (record.study_instance_uid, record.series_instance_uid)
            cached = known.get(place)
            if cached is None and place[1] in filed:
                series_pk, study_pk, study_uid = filed[place[1]]
                if study_uid != place[0]:
                    unreferenced.append(blob.key)
                    results[i] = outcome(
                        Status.REJECTED, item.offer, record,
                        index.series_elsewhere(place[1]).message,
                        FailureReason.PROCESSING_FAILURE)
                    continue
                cached = known[place] = (series_pk, study_pk)
            if not overwrite and cached is not None:
                series_pk, study_pk = cached
                rows.append(index.instance_row(record, blob.key, series_pk, study_pk, now))
                taken.add(record.sop_instance_uid)
                added[study_pk] += 1
                results[i] = outcome(Status.STORED, item.offer, record)
                continue
            savepoint = conn.begin_nested()
            try:
                stored, freed, stored_study = index.store(
                    archive.db, conn, record, blob.key, overwrite=overwrite, known=known,
                )
                savepoint.commit()
            except Conflict as exc:
                savepoint.rollback()
                known.clear()  # rows it remembered may have been rolled back
                unreferenced.append(blob.key)
                results[i] = outcome(Status.REJECTED, item.offer, record, exc.message,
                                      FailureReason.PROCESSING_FAILURE)
                continue
            taken.add(record.sop_instance_uid)
            if freed is not None:
                unreferenced.append(freed)
            if stored_study is not None:
                refresh.add(stored_study)
            status = Status.DUPLICATE if stored is index.Stored.DUPLICATE else Status.STORED
            results[i] = outcome(status, item.offer, record)
        index.add_instances(conn, rows, refresh, added)
        _wait_durable(items)  # nothing is committed before its blob is durable
    return [r for r in results if r is not None], unreferenced


@dataclass
class _Job:
    """One caller's items, waiting for a group commit."""

    items: Sequence[Prepared]
    ready: threading.Event = field(default_factory=threading.Event)
    outcomes: list[Outcome] | None = None
    error: BaseException | None = None


class _GroupCommit:
    """Index transactions of concurrent callers, merged.

    The first caller writes its transaction at once. Callers arriving
    meanwhile queue up; when the transaction is committed, the first of them
    writes one transaction for all of them and hands over in turn. Each
    caller returns once its own items are committed, so nothing is
    acknowledged before it is durable; under load, one commit (and one fsync
    of the index) serves many instances, and the write lock is taken once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: list[_Job] = []
        self._busy = False

    def run(self, archive: Archive, items: Sequence[Prepared]) -> list[Outcome]:
        job = _Job(items)
        with self._lock:
            self._waiting.append(job)
            lead, self._busy = not self._busy, True
        if not lead:
            job.ready.wait()  # set when done, or when it is this job's turn to lead
        if job.outcomes is None and job.error is None:
            self._lead(archive)
        if job.error is not None:
            raise job.error
        assert job.outcomes is not None
        return job.outcomes

    def _lead(self, archive: Archive) -> None:
        with self._lock:
            batch, self._waiting = self._waiting, []
        try:
            outcomes = _index(archive, [item for job in batch for item in job.items])
            start = 0
            for job in batch:
                job.outcomes = outcomes[start:start + len(job.items)]
                start += len(job.items)
        except BaseException as exc:
            for job in batch:
                job.error = exc
        finally:
            with self._lock:
                if self._waiting:
                    self._waiting[0].ready.set()  # it leads the next transaction
                else:
                    self._busy = False
            for job in batch:
                job.ready.set()


_groups: weakref.WeakKeyDictionary[Database, _GroupCommit] = weakref.WeakKeyDictionary()
_groups_lock = threading.Lock()


def _group(db: Database) -> _GroupCommit:
    with _groups_lock:
        found = _groups.get(db)
        if found is None:
            found = _groups[db] = _GroupCommit()
        return found
