"""Blobs asked for ahead of a study retrieve: which, when, and that the hint
really brings a blob's bytes into memory."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from lightbox.archive import Archive
from lightbox.index.instances import StoredInstance
from lightbox.services.retrieve import ReadAhead
from lightbox.storage.blobs import FileBlobStore
from tests.factories import drop_from_page_cache, in_page_cache

MIB = 1 << 20


def _key(n: int) -> str:
    return f"{n:032x}"  # a well-formed key with no blob behind it


def _instance(n: int, size: int) -> StoredInstance:
    return StoredInstance("1.2", "1.2.3", f"1.2.3.{n}", "1.2.840.10008.5.1.4.1.1.2",
                          "1.2.840.10008.1.2.1", _key(n), size, None, 1)


def test_blobs_are_asked_for_once_in_order_and_within_the_window(archive: Archive) -> None:
    instances = [_instance(n, MIB // 2) for n in range(40)]  # 20 MiB in all
    ahead = ReadAhead(instances, window=4 * MIB)
    asked: list[tuple[int, list[str]]] = []
    for current in range(len(instances)):
        keys = ahead.keys_for(current)
        if keys:
            asked.append((current, keys))
        archive.blobs.prefetch(keys)  # the blobs do not exist: a hint never fails
    flat = [key for _, batch in asked for key in batch]
    assert flat == [i.blob_key for i in instances]
    assert asked[0] == (0, [_key(n) for n in range(8)])  # the first 4 MiB at once
    for current, batch in asked:
        # Asked again only once less than half the window was left, never past it.
        end = flat.index(batch[-1]) + 1
        assert sum(i.size for i in instances[current:end]) <= 4 * MIB
        assert current == 0 or flat.index(batch[0]) - current <= 4


def test_a_large_instance_still_moves_the_window_on() -> None:
    sizes = [100 * MIB, MIB, MIB]
    instances = [_instance(n, size) for n, size in enumerate(sizes)]
    ahead = ReadAhead(instances, window=16 * MIB)
    assert ahead.keys_for(0) == [_key(0)]
    assert ahead.keys_for(1) == [_key(1), _key(2)]
    assert ahead.keys_for(2) == []


def test_prefetch_brings_a_blob_into_the_page_cache(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path)
    fd, staged = store.new_staging_file()
    data = os.urandom(3 * MIB // 2)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    key = store.put_file(staged)
    path = store.path(key)
    if not drop_from_page_cache(path):
        pytest.skip("this filesystem keeps every page in memory (tmpfs, say)")
    store.prefetch([_key(7), key])  # a key with no blob behind it is passed over
    deadline = time.monotonic() + 10
    while not in_page_cache(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert in_page_cache(path)
    assert path.read_bytes() == data
    store.close()
