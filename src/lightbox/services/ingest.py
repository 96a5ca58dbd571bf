"""The one ingest path: every source (STOW-RS, C-STORE, import, upload) ends here.

Per batch: move each file under a fresh key and make it durable (fsync of
data, then of the directory) while its header is parsed and validated and
the index transaction does its work (``indexing``), which commits only once
the blobs are durable. If indexing fails, the blob is removed. An outcome of
STORED means both the bytes and the index row are durable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from lightbox.archive import Archive
from lightbox.dicom.instance import InstanceRecord, MissingOrInvalidUID, read_instance
from lightbox.errors import InvalidInstance
from lightbox.services import indexing
from lightbox.services.offers import (
    Blob,
    FailureReason,
    Header,
    Offer,
    Outcome,
    Prepared,
    Status,
    outcome,
)
from lightbox.storage.blobs import fsync_file

__all__ = ["FailureReason", "Header", "Offer", "Outcome", "Prepared", "Status", "commit",
           "discard", "prepare", "store_instances"]

log = logging.getLogger(__name__)


# Headers are parsed while other files' fsyncs are in flight: the waits overlap.
_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ingest")


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
        indexed = indexing.write(archive, [p for _, p in accepted])
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
        failure = outcome(Status.REJECTED, offer, record, "storage is not writable",
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
        return outcome(Status.REJECTED, offer, exc.record, exc.message,
                        FailureReason.STUDY_UID_MISMATCH)
    failure = FailureReason.CANNOT_UNDERSTAND
    if isinstance(exc, MissingOrInvalidUID):
        failure = FailureReason.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    return Outcome(Status.REJECTED, offer.source, reason=exc.message, failure=failure)


def _discard(offer: Offer) -> None:
    if offer.staged:
        offer.path.unlink(missing_ok=True)
