"""Does the blob store hold what the index says, and nothing else?

``lightbox check`` walks the index and the blob store side by side, both in
key order, so that its memory stays flat whatever their size:

- an instance whose blob is missing, or of another size than indexed, is a
  problem (its bytes are lost or damaged; the command exits 1);
- a blob that no instance refers to is an orphan. Orphans are what an
  interruption leaves between a blob and its index row: a power cut after a
  blob's fsync and before its index commit, or after a deletion's commit and
  before its blobs are removed. Nobody can retrieve them; they only take
  space. Those older than ``ORPHAN_AGE`` may be removed: a younger one may
  belong to an ingest still under way, or to one indexed after the walk of
  the index began. A blob's age counts from its rename into the store (its
  ctime), not from when its bytes were written: the parts of a long upload
  are written long before they become blobs and are indexed.

Everything found is checked again before it is reported or removed, since
the archive may be storing and deleting meanwhile.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from lightbox.archive import Archive
from lightbox.index import blobs as index_blobs

ORPHAN_AGE = 3600.0  # seconds since a blob was written before it may be judged an orphan


@dataclass(frozen=True)
class Damaged:
    """An indexed instance whose blob is missing (``on_disk`` None) or of another size."""

    sop_instance_uid: str
    key: str
    indexed: int
    on_disk: int | None


@dataclass
class Report:
    instances: int = 0
    blobs: int = 0
    damaged: list[Damaged] = field(default_factory=list)
    orphans: int = 0  # old enough to judge
    orphan_bytes: int = 0
    young: int = 0  # unreferenced, but too recent to judge
    removed: int = 0
    removed_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.damaged


Progress = Callable[[int], object]
"""Told how many more blobs and rows have been compared."""


def check(archive: Archive, *, remove_orphans: bool = False, orphan_age: float = ORPHAN_AGE,
          progress: Progress | None = None) -> Report:
    """Compare the index with the blob store; remove old orphans on request."""
    report = Report()
    suspects: list[Damaged] = []
    orphans: list[tuple[str, int]] = []
    started = time.time()
    with archive.db.read() as conn:
        indexed = index_blobs.in_key_order(conn, sqlite=archive.db.is_sqlite)
        for row, blob in _merge(indexed, archive.blobs.listing()):
            if progress is not None:
                progress(1)
            if row is not None:
                report.instances += 1
                key, size, uid = row
                if blob is None or blob[1] != size:
                    suspects.append(Damaged(uid, key, size, None if blob is None else blob[1]))
            if blob is not None:
                report.blobs += 1
                if row is None:
                    key, size, since = blob
                    if started - since < orphan_age:
                        report.young += 1
                    else:
                        orphans.append((key, size))
    # Still indexed and still wrong (a deletion may have removed both meanwhile).
    report.damaged = damaged(archive, [s.sop_instance_uid for s in suspects])
    for key, size in _still_unreferenced(archive, orphans):
        report.orphans += 1
        report.orphan_bytes += size
        if remove_orphans:
            archive.blobs.delete(key)
            report.removed += 1
            report.removed_bytes += size
    return report


Row = tuple[str, int, str]
Blob = tuple[str, int, float]


def _merge(rows: Iterable[Row], blobs: Iterable[Blob]) -> Iterator[tuple[Row | None, Blob | None]]:
    """Pairs of an index row and the blob of the same key, either None when
    the other side has no such key; both inputs in key order."""
    row_iter, blob_iter = iter(rows), iter(blobs)
    row, blob = next(row_iter, None), next(blob_iter, None)
    while row is not None or blob is not None:
        if blob is None or (row is not None and row[0] < blob[0]):
            yield row, None
            row = next(row_iter, None)
        elif row is None or blob[0] < row[0]:
            yield None, blob
            blob = next(blob_iter, None)
        else:
            yield row, blob
            row, blob = next(row_iter, None), next(blob_iter, None)


def damaged(archive: Archive, sop_instance_uids: Sequence[str]) -> list[Damaged]:
    """Those of the indexed instances ``sop_instance_uids`` whose file is
    missing or of another size than indexed (storage commitment asks this
    of every instance it is to confirm)."""
    with archive.db.read() as conn:
        rows = index_blobs.of_instances(conn, sop_instance_uids)
    found = []
    for uid, key, indexed in rows:
        try:
            size: int | None = os.stat(archive.blobs.path(key)).st_size
        except FileNotFoundError:
            size = None
        if size != indexed:
            found.append(Damaged(uid, key, indexed, size))
    return found


def _still_unreferenced(
    archive: Archive, found: Sequence[tuple[str, int]]
) -> list[tuple[str, int]]:
    """The blobs that no instance row refers to now."""
    with archive.db.read() as conn:
        referenced = index_blobs.referenced(conn, [key for key, _ in found])
    return [(key, size) for key, size in found if key not in referenced]
