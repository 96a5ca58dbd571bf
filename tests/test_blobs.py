"""The filesystem blob store's staging files: empty files made ahead (spares)
and their clean-up."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lightbox.storage.blobs import FileBlobStore, SpareFiles, new_key


def _wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def _spares(store: FileBlobStore) -> set[Path]:
    return set(store.staging_dir().iterdir()) - set(store.staged())


def test_staging_files_come_empty_and_writable_and_spares_go_on_close(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path)
    taken = []
    for i in range(3):
        fd, path = store.new_staging_file()
        assert path.parent == store.staging_dir()
        assert path.stat().st_size == 0
        os.write(fd, f"instance {i}".encode())
        os.close(fd)
        taken.append(path)
    assert len({p.name for p in taken}) == 3
    # The thread makes spares ahead, in staging, empty; what was taken is what
    # staging holds besides them.
    assert _wait_for(lambda: len(_spares(store)) == SpareFiles.KEEP)
    assert all(p.stat().st_size == 0 for p in _spares(store))
    assert sorted(store.staged()) == sorted(taken)
    key = store.put_file(taken[0])
    assert store.path(key).read_bytes() == b"instance 0"
    spares = _spares(store)
    store.close()
    assert not any(p.exists() for p in spares)
    # What was taken is the caller's; a take after close still works.
    assert sorted(store.staging_dir().iterdir()) == sorted(taken[1:])
    fd, path = store.new_staging_file()
    os.close(fd)
    assert path.parent == store.staging_dir()
    assert sorted(store.staging_dir().iterdir()) == sorted([*taken[1:], path])


def test_a_spare_past_its_age_is_not_handed_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileBlobStore(tmp_path)
    fd, _path = store.new_staging_file()
    os.close(fd)
    assert _wait_for(lambda: len(_spares(store)) == SpareFiles.KEEP)
    made_before = _spares(store)
    monkeypatch.setattr(SpareFiles, "MAX_AGE", 0.0)
    fd, path = store.new_staging_file()
    os.close(fd)
    # Made there and then, not one of the old spares; the old ones are removed.
    assert path not in made_before
    assert _wait_for(lambda: not made_before & set(store.staging_dir().iterdir()))
    store.close()


def test_a_spare_removed_meanwhile_is_replaced(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path)
    fd, _path = store.new_staging_file()
    os.close(fd)
    assert _wait_for(lambda: len(_spares(store)) == SpareFiles.KEEP)
    for p in _spares(store):  # by hand, say
        p.unlink()
    fd, path = store.new_staging_file()
    os.write(fd, b"still stored")
    os.close(fd)
    assert path.read_bytes() == b"still stored"
    store.close()


def test_start_up_sweep_removes_old_leftovers_only(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path)
    old_spare = tmp_path / ".spare" / "in-old"  # where earlier versions kept spares
    old_spare.parent.mkdir()
    old = store.staging_dir() / "in-old"
    new = store.staging_dir() / "in-new"
    for path in (old_spare, old, new):
        path.touch()
    for path in (old_spare, old):
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    store.clear_staging()
    assert not old.exists() and not old_spare.exists() and new.exists()


def test_file_name_is_the_path(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path / "blobs")
    try:
        key = new_key()
        assert store.file_name(key) == str(store.path(key))
        with pytest.raises(ValueError, match="not a blob key"):
            store.file_name("../" + key[3:])
    finally:
        store.close()
