"""The one ingest path: every source (STOW-RS, C-STORE, import, upload) ends here.

Per batch: move each file under a fresh key and make it durable (fsync of
data, then of the directory) while its header is parsed and validated and
the index transaction does its work (see ``_transaction``), which commits
only once the blobs are durable. If indexing fails, the blob is removed. An
outcome of STORED means both the bytes and the index row are durable.

The index transactions of callers that arrive while another one is being
written (parallel C-STORE associations, STOW requests) are merged into the
next one: one commit, one fsync, for all of them ("group commit").
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import shutil
import stat
import threading
import weakref
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from lightbox.archive import Archive
from lightbox.dicom.instance import InstanceRecord, MissingOrInvalidUID, read_instance
from lightbox.errors import Conflict, InvalidInstance
from lightbox.index import instances as index
from lightbox.index.db import Database
from lightbox.storage.blobs import BlobStore, fsync_file

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


# Headers are parsed while other files' fsyncs are in flight: the waits overlap.
_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ingest")


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


def store_instances(
    archive: Archive, offers: Sequence[Offer], *, expected_study: str | None = None
) -> list[Outcome]:
    """Store a batch of files; return one Outcome per offer, in order.

    Staged files are consumed (moved or deleted) whatever the outcome.
    """
    return commit(archive, prepare(archive, offers, expected_study))


def discard(prepared: Sequence[Prepared]) -> None:
    """Forget prepared offers that will not be committed (their blobs go)."""
    for item in prepared:
        if item.blob is not None:
            item.blob.delete()
        _discard(item.offer)


def commit(archive: Archive, prepared: Sequence[Prepared]) -> list[Outcome]:
    """Index what ``prepare`` accepted; one Outcome per item, in order."""
    outcomes: list[Outcome | None] = [p.rejected for p in prepared]
    accepted = [(i, p) for i, p in enumerate(prepared) if p.record is not None]
    if accepted:
        indexed = _group(archive.db).run(archive, [p for _, p in accepted])
        for (i, _), outcome in zip(accepted, indexed, strict=True):
            outcomes[i] = outcome
    return [o for o in outcomes if o is not None]


def prepare(
    archive: Archive, offers: Sequence[Offer], expected_study: str | None
) -> list[Prepared]:
    """Check each offer and make its bytes a durable blob.

    Staged files become blobs at once (a rename); the fsyncs (and copies of
    files from elsewhere) run on the ingest pool while this thread parses the
    headers one after the other: the disk waits overlap with the parsing, and
    only one thread does Python work (several parsing at once only fight over
    the interpreter lock). The file's data is synced after the rename so that
    the directory's sync finds nothing left to write. A batch of one file
    whose bytes are not synced yet goes the other way round (see
    ``_prepare_alone``). Nothing is indexed until ``commit``.
    """
    # A header read ahead was read from a file with its preamble.
    offers = [offer if offer.header_if_read() is not None else _with_preamble(archive, offer)
              for offer in offers]
    adopted = [_adopt(archive, offer) for offer in offers]
    if len(offers) == 1 and not offers[0].synced:
        path, key = adopted[0]
        if key is not None:
            return [_prepare_alone(archive, offers[0], path, key, expected_study)]
    # Staged files whose bytes are synced need only their new names made
    # durable: one directory sync for all of them, on the pool too, while
    # this thread checks the headers and the index transaction does its work.
    synced = {key for offer, (_path, key) in zip(offers, adopted, strict=True)
              if key is not None and offer.synced}
    named = _pool.submit(_sync_names, archive, sorted(synced)) if synced else None
    durable = [
        _named(named, archive, offer, key) if named is not None and key in synced
        else _pool.submit(_make_durable, archive, offer, key)
        for offer, (_path, key) in zip(offers, adopted, strict=True)
    ]
    # Last first: headers still being read ahead come in order, so while this
    # thread reads the last ones itself, the helper finishes the earlier ones.
    try:
        checked = [
            _prepared(archive, offer, path, key, blob, expected_study)
            for offer, (path, key), blob in reversed(list(zip(offers, adopted, durable,
                                                                strict=True)))
        ]
    except BaseException:
        # A failure the caller reports (nothing else raises here): no blob stays.
        for made in durable:
            with contextlib.suppress(Exception):
                archive.blobs.delete(made.result())
        raise
    return checked[::-1]


def _prepare_alone(archive: Archive, offer: Offer, path: Path, key: str,
                   expected_study: str | None) -> Prepared:
    """A batch of one file whose bytes are not synced yet (a C-STORE, say), now
    the blob ``key``: the other way round from a batch. Its header is read on
    the pool while this thread makes the blob durable, since an fsync lets go
    of the interpreter lock for its whole wait and the header read starts at
    once. Handed to the pool, the fsync would start only when this thread's
    parsing let go of the lock, most of a millisecond later; the index
    transaction would then wait for it."""
    header = offer.header_if_read()
    reading = _pool.submit(_read_aside, path) if header is None else None
    durable: Future[str] = Future()
    try:
        fsync_file(path)
        archive.blobs.sync([key])
        durable.set_result(key)
    except OSError as exc:
        durable.set_exception(exc)
    try:
        if reading is not None:
            header = reading.result()
        prepared = _prepared(archive, replace(offer, header=header), path, key, durable,
                             expected_study)
    except BaseException:
        archive.blobs.delete(key)  # a failure the caller reports: nothing is left stored
        raise
    if durable.exception() is not None:
        archive.blobs.delete(key)  # only now: the header was being read from it
    return prepared


def _read_aside(path: Path) -> Header:
    """The header of ``path`` as ``Offer.header`` holds it (None: ingest reads
    it again, and says why it cannot)."""
    try:
        return read_instance(path)
    except InvalidInstance as exc:
        return exc
    except OSError:
        return None


def _sync_names(archive: Archive, keys: list[str]) -> set[str]:
    """``keys`` whose directory entries are now durable (none if that failed:
    each is then tried again on its own, and a failure reported for it)."""
    if not keys:
        return set()
    try:
        archive.blobs.sync(keys)
    except OSError:
        return set()
    return set(keys)


def _named(named: Future[set[str]], archive: Archive, offer: Offer, key: str) -> Future[str]:
    """The blob ``key``, durable once the shared directory sync (``named``)
    is done; if that failed, once its own try (``_make_durable``) is."""
    done: Future[str] = Future()

    def settle(result: Future[Any]) -> None:
        try:
            done.set_result(result.result())
        except BaseException as exc:
            done.set_exception(exc)  # raised to whoever waits for the blob

    def after_sync(sync: Future[set[str]]) -> None:
        try:
            if key in sync.result():
                done.set_result(key)
                return
            _pool.submit(_make_durable, archive, offer, key).add_done_callback(settle)
        except BaseException as exc:
            if not done.done():
                done.set_exception(exc)

    named.add_done_callback(after_sync)
    return done


def _adopt(archive: Archive, offer: Offer) -> tuple[Path, str | None]:
    """Where to read the offer's header, and the key of the blob a staged
    offer became (``None``: the ingest pool copies or moves it)."""
    if not offer.staged:
        return offer.path, None
    try:
        key = archive.blobs.put_file(offer.path, sync_dir=False)
    except OSError:
        return offer.path, None  # the pool tries again and reports the error
    return archive.blobs.path(key), key


def _make_durable(archive: Archive, offer: Offer, key: str | None) -> str:
    """The offer's bytes as a blob whose data and name are on stable storage."""
    synced = offer.synced and offer.staged
    if key is None:
        source = offer.path if offer.staged else _copy_to_staging(archive, offer)
        try:
            key = archive.blobs.put_file(source, sync_dir=False)
        except OSError:
            if not offer.staged:
                source.unlink(missing_ok=True)
            raise
    try:
        if not synced:
            fsync_file(archive.blobs.path(key))
        archive.blobs.sync([key])
    except OSError:
        archive.blobs.delete(key)
        raise
    return key


def _copy_to_staging(archive: Archive, offer: Offer) -> Path:
    fd, target = archive.blobs.new_staging_file()
    try:
        with os.fdopen(fd, "wb") as out, open(offer.path, "rb") as src:
            shutil.copyfileobj(src, out, 1024 * 1024)
    except OSError:
        target.unlink(missing_ok=True)
        raise
    return target


def _prepared(
    archive: Archive, offer: Offer, path: Path, key: str | None, durable: Future[str],
    expected_study: str | None,
) -> Prepared:
    try:
        record = _validate(archive, path, expected_study, offer.header_if_read())
    except InvalidInstance as exc:
        record, rejection = None, _rejected(offer, exc)
    if record is not None and key is not None and not durable.done():
        # Its key is known: the index transaction waits for its fsync.
        return Prepared(offer, record, None, Blob(archive.blobs, key), durable)
    try:
        blob = Blob(archive.blobs, durable.result())
    except OSError as exc:
        log.error("cannot store %s: %s", offer.source, exc)
        _discard(offer)
        if record is None:
            return Prepared(offer, None, rejection)
        failure = _outcome(Status.REJECTED, offer, record, "storage is not writable",
                           FailureReason.OUT_OF_RESOURCES)
        return Prepared(offer, None, failure)
    if record is None:
        blob.delete()
        return Prepared(offer, None, rejection)
    return Prepared(offer, record, None, blob)


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


def _validate(
    archive: Archive, path: Path, expected_study: str | None,
    header: InstanceRecord | InvalidInstance | None = None,
) -> InstanceRecord:
    try:
        found = os.stat(path)
        if not stat.S_ISREG(found.st_mode):
            raise InvalidInstance("not a regular file")
        size = found.st_size
        if size > archive.settings.max_instance_bytes:
            raise InvalidInstance(f"object of {size} bytes exceeds the limit")
        if isinstance(header, InvalidInstance):
            raise header
        record = read_instance(path, size) if header is None else header
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
            _outcome(Status.REJECTED, item.offer, item.record, "index is not writable",
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
            outcomes.append(_outcome(Status.REJECTED, item.offer, item.record,
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
                results[i] = _outcome(Status.DUPLICATE, item.offer, record)
                continue
            place = (record.study_instance_uid, record.series_instance_uid)
            cached = known.get(place)
            if cached is None and place[1] in filed:
                series_pk, study_pk, study_uid = filed[place[1]]
                if study_uid != place[0]:
                    unreferenced.append(blob.key)
                    results[i] = _outcome(
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
                results[i] = _outcome(Status.STORED, item.offer, record)
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
                results[i] = _outcome(Status.REJECTED, item.offer, record, exc.message,
                                      FailureReason.PROCESSING_FAILURE)
                continue
            taken.add(record.sop_instance_uid)
            if freed is not None:
                unreferenced.append(freed)
            if stored_study is not None:
                refresh.add(stored_study)
            status = Status.DUPLICATE if stored is index.Stored.DUPLICATE else Status.STORED
            results[i] = _outcome(status, item.offer, record)
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
