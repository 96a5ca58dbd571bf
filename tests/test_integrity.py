"""``lightbox check``: the index against the blob store, on both databases."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from lightbox.archive import Archive
from lightbox.index import instances as index
from lightbox.index.schema import instances
from lightbox.services import integrity
from lightbox.services.ingest import Status, store_instances
from tests.factories import ct_dataset, to_bytes
from tests.test_ingest import staged

HOUR = 3600.0


def _store(archive: Archive, count: int) -> dict[str, str]:
    """``count`` instances of one new study; SOP Instance UID -> blob key."""
    first = ct_dataset()
    batch = [first] + [ct_dataset(study=first.StudyInstanceUID, series=first.SeriesInstanceUID,
                                  instance_number=n) for n in range(2, count + 1)]
    outcomes = store_instances(archive, [staged(archive, to_bytes(ds)) for ds in batch])
    assert all(o.status is Status.STORED for o in outcomes)
    with archive.db.read() as conn:
        rows = conn.execute(select(instances.c.sop_instance_uid, instances.c.blob_key))
        return {str(uid): str(key) for uid, key in rows}


def _orphan(archive: Archive, key: str, data: bytes) -> Path:
    """A file at blob key ``key`` that no instance refers to."""
    path = archive.blobs.path(key)
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path


AGE = 0.5  # seconds: a blob's age counts from its ctime, which a test cannot set back


def _aged() -> None:
    time.sleep(AGE + 0.2)


def test_a_sound_archive_checks_out(archive: Archive) -> None:
    keys = _store(archive, 3)
    report = integrity.check(archive)
    assert report.ok
    assert (report.instances, report.blobs, report.orphans, report.young) == (3, 3, 0, 0)
    assert report.damaged == []
    assert set(keys.values()) == {k for k, _, _ in archive.blobs.listing()}


def test_missing_and_damaged_blobs_are_named(archive: Archive) -> None:
    keys = _store(archive, 3)
    gone, cut, kept = sorted(keys)
    archive.blobs.path(keys[gone]).unlink()
    with open(archive.blobs.path(keys[cut]), "r+b") as fh:
        fh.truncate(100)
    report = integrity.check(archive)
    assert not report.ok
    assert report.instances == 3 and report.blobs == 2
    found = {d.sop_instance_uid: (d.key, d.on_disk) for d in report.damaged}
    assert found == {gone: (keys[gone], None), cut: (keys[cut], 100)}
    assert kept not in found


def test_old_orphans_are_counted_and_removed_on_request_young_ones_and_strangers_not(
    archive: Archive,
) -> None:
    keys = _store(archive, 2)
    prefix = next(iter(keys.values()))[:6]
    old = _orphan(archive, prefix + "f" * 26, b"old")
    older = _orphan(archive, "000000" + "a" * 26, b"older")  # a folder of its own
    # Not blobs: other names, a link named like a key, a folder named like one.
    strangers = [archive.blobs.root / prefix / "notes.txt", archive.blobs.root / "README"]
    for path in strangers:
        path.write_text("not a blob")
    link = archive.blobs.root / prefix / (prefix + "d" * 26)
    link.symlink_to(archive.blobs.path(next(iter(keys.values()))))
    (archive.blobs.root / "abcdef").mkdir()
    (archive.blobs.root / "abcdef" / ("abcdef" + "c" * 26)).mkdir()
    _aged()
    young = _orphan(archive, prefix + "e" * 26, b"young")

    looked = integrity.check(archive, orphan_age=AGE)
    assert looked.ok and (looked.instances, looked.blobs) == (2, 5)
    assert (looked.orphans, looked.orphan_bytes, looked.young) == (2, len(b"old") + 5, 1)
    assert looked.removed == 0 and old.exists() and older.exists()
    assert integrity.check(archive).orphans == 0  # an hour, by default

    removed = integrity.check(archive, remove_orphans=True, orphan_age=AGE)
    assert (removed.removed, removed.removed_bytes) == (2, len(b"old") + 5)
    assert not old.exists() and not older.exists()
    assert young.exists() and link.is_symlink() and all(p.exists() for p in strangers)
    assert all(archive.blobs.path(k).exists() for k in keys.values())
    again = integrity.check(archive, orphan_age=60)
    assert again.ok and (again.orphans, again.young, again.blobs) == (0, 1, 3)


def test_an_old_file_that_just_became_a_blob_is_not_an_orphan(archive: Archive) -> None:
    """The parts of a long upload are written well before they are renamed
    into the store: age counts from the rename."""
    keys = _store(archive, 1)
    written = archive.blobs.staging_dir() / "long-upload-part"
    written.write_bytes(b"part")
    then = time.time() - 2 * HOUR
    os.utime(written, (then, then))
    _aged()
    path = archive.blobs.path(next(iter(keys.values()))[:6] + "b" * 26)
    written.rename(path)
    report = integrity.check(archive, remove_orphans=True, orphan_age=AGE)
    assert (report.orphans, report.young, report.removed) == (0, 1, 0)
    assert path.exists()


def test_what_changes_during_the_walk_is_not_reported(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An instance deleted (row, then blob) after the walk read the index and
    before it listed the blobs is not reported as damaged; one stored then is
    too young to judge."""
    keys = _store(archive, 4)
    doomed = sorted(keys)[-1]
    study = pydicom.dcmread(archive.blobs.path(keys[doomed])).StudyInstanceUID
    listing = archive.blobs.listing

    def meanwhile() -> Iterator[tuple[str, int, float]]:
        with archive.db.write() as conn:  # as a deletion does it: the rows, then the blobs
            removed = index.remove(conn, study, sop=doomed)
        for key in removed:
            archive.blobs.delete(key)
        _store(archive, 1)
        return listing()

    monkeypatch.setattr(archive.blobs, "listing", meanwhile)
    report = integrity.check(archive)
    assert report.ok and report.damaged == []
    assert (report.instances, report.blobs, report.orphans, report.young) == (4, 4, 0, 1)


def test_the_command_exits_1_on_damage_and_removes_orphans(archive: Archive) -> None:
    keys = _store(archive, 2)
    env = {**os.environ, "LIGHTBOX_DATA": str(archive.settings.data),
           "LIGHTBOX_DATABASE": archive.settings.database}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "lightbox", "check", *args], env=env,
                              capture_output=True, text=True, timeout=120)

    sound = run()
    assert sound.returncode == 0, sound.stderr
    assert sound.stdout.splitlines() == ["2 instances, 2 stored files", "ok"]

    orphan = _orphan(archive, next(iter(keys.values()))[:6] + "f" * 26, b"x" * 10)
    fresh = run()
    assert fresh.returncode == 0
    assert ("1 newer file that no instance refers to yet: not judged (stored within 1h)"
            in fresh.stdout)
    _aged()
    found = run("--older-than", f"{AGE}s")
    assert found.returncode == 0
    assert "orphans: 1 stored file (10 bytes) that no instance refers to" in found.stdout
    assert "lightbox check --remove-orphans" in found.stdout
    removed = run("--remove-orphans", "--older-than", f"{AGE}s")
    assert removed.returncode == 0 and "removed 1 orphan (10 bytes)" in removed.stdout
    assert not orphan.exists()
    bad = run("--older-than", "soon")
    assert bad.returncode != 0 and "not a duration" in bad.stderr

    uid, key = next(iter(keys.items()))
    archive.blobs.path(key).unlink()
    damaged = run()
    assert damaged.returncode == 1
    assert f"damaged: instance {uid}: file {key} missing" in damaged.stdout
    assert damaged.stdout.splitlines()[-1] == "1 damaged instance"
