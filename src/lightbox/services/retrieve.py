"""Retrieval: which stored objects a caller gets, and their frames and metadata."""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

from lightbox.archive import Archive
from lightbox.dicom import uids
from lightbox.errors import NotFound
from lightbox.index import instances as index
from lightbox.index.instances import StoredInstance
from lightbox.services import access
from lightbox.services.auth import Principal


class InstanceCache:
    """Recently used StoredInstance rows by UID path: frame requests skip the index."""

    def __init__(self, size: int = 20_000) -> None:
        self._items: OrderedDict[tuple[str, str, str], StoredInstance] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, str]) -> StoredInstance | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, item: StoredInstance) -> None:
        key = (item.study_instance_uid, item.series_instance_uid, item.sop_instance_uid)
        with self._lock:
            self._items[key] = item
            if len(self._items) > self._size:
                self._items.popitem(last=False)

    def discard(self, key: tuple[str, str, str]) -> None:
        with self._lock:
            self._items.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class ReadAhead:
    """Instances sent one after the other, their blobs asked for ahead of
    their turn: while one is sent, the disk reads the next ones instead of
    waiting for the first read of each. Up to ``window`` bytes are asked for
    ahead, in batches (asked again once less than half of it is left)."""

    def __init__(self, instances: Sequence[StoredInstance],
                 window: int = 16 * 1024 * 1024) -> None:
        self._keys = [i.blob_key for i in instances]
        # Where each instance starts in the stream of all of them, and the end.
        self._offsets = [0, *accumulate(i.size for i in instances)]
        self._window = window
        self._asked = 0  # instances[:_asked] have been asked for

    def keys_for(self, current: int) -> list[str]:
        """The blobs to ask the store for (``prefetch``) as ``instances[current]``
        is about to be sent; none most of the time."""
        start = max(self._asked, current)
        sent = self._offsets[current]
        if self._offsets[start] - sent > self._window // 2:
            return []
        # Every instance that starts within the window.
        end = bisect_left(self._offsets, sent + self._window, lo=start, hi=len(self._keys))
        self._asked = end
        return self._keys[start:end]


@dataclass(frozen=True)
class Frame:
    """One frame's bytes and the transfer syntax they are encoded in."""

    data: bytes
    transfer_syntax_uid: str


def find_instances(
    archive: Archive,
    principal: Principal,
    study: str,
    series: str | None = None,
    sop: str | None = None,
) -> list[StoredInstance]:
    """The stored instances in scope, after checking the caller may see the study."""
    principal.require_read(study)
    with archive.db.read() as conn:
        return index.find(conn, study, series, sop)


def download_instances(
    archive: Archive,
    principal: Principal,
    study: str,
    series: str | None = None,
    sop: str | None = None,
) -> list[StoredInstance]:
    """Instances to be handed over as whole files: the caller must also be
    allowed to download the study (a folder switch)."""
    access.require_download(principal, study)
    return find_instances(archive, principal, study, series, sop)


def find_instance(
    archive: Archive, cache: InstanceCache, principal: Principal, study: str, series: str, sop: str
) -> StoredInstance:
    """One instance, from the cache when possible."""
    principal.require_read(study)
    found = cache.get((study, series, sop))
    if found is not None and not archive.blobs.path(found.blob_key).exists():
        # Deleted through another worker process since it was cached.
        cache.discard((study, series, sop))
        found = None
    if found is None:
        # Viewers fetch every instance of a series, each once: one query for
        # the whole series fills the cache for the frames that follow (and
        # lets them take the fast path).
        found = None
        for item in find_instances(archive, principal, study, series):
            cache.put(item)
            if item.sop_instance_uid == sop:
                found = item
        if found is None:
            raise NotFound(f"instance {sop} not found in series {series}")
    return found


def metadata(
    archive: Archive, principal: Principal, study: str, series: str | None = None,
    sop: str | None = None,
) -> bytes:
    """DICOM JSON array of the instances in scope, with the base placeholder unresolved."""
    principal.require_read(study)
    with archive.db.read() as conn:
        parts = index.metadata(conn, study, series, sop)
    return b"[" + b",".join(parts) + b"]"


# Pixel data whose frames ingest could not map: it is decoded instead.
_UNMAPPED_SYNTAXES = (uids.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, uids.EXPLICIT_VR_BIG_ENDIAN)


def read_ranges(
    archive: Archive, instance: StoredInstance, ranges: Sequence[tuple[int, int]]
) -> bytes:
    """The bytes of the stored file at ``ranges`` (offset, length), joined."""
    if len(ranges) == 1:
        return archive.blobs.read_range(instance.blob_key, *ranges[0])
    return b"".join(archive.blobs.read_range(instance.blob_key, o, n) for o, n in ranges)


def stored_frame(archive: Archive, instance: StoredInstance, number: int) -> Frame | None:
    """Frame ``number`` (1-based) as stored, by ranged reads; None when the stored
    form cannot be cut into frames directly (the caller then decodes)."""
    layout = instance.layout
    if layout is not None and not layout.frames:
        return None  # bit-packed frames: not byte-addressable
    if instance.transfer_syntax_uid in uids.VIDEO_MEDIA_TYPES:
        return None  # one stream: its frames exist only once decoded
    if layout is None:
        if instance.transfer_syntax_uid in _UNMAPPED_SYNTAXES:
            return None  # byte positions in the file do not map to frames
        raise NotFound(f"instance {instance.sop_instance_uid} has no pixel data")
    if not 1 <= number <= len(layout.frames):
        raise NotFound(f"frame {number} not in instance (it has {len(layout.frames)})")
    data = read_ranges(archive, instance, layout.frames[number - 1])
    syntax = instance.transfer_syntax_uid
    if not layout.encapsulated:
        # Native frames are the same bytes in implicit and explicit little endian.
        syntax = uids.EXPLICIT_VR_LITTLE_ENDIAN
    return Frame(data, syntax)
