"""Blob stores: a small interface and the filesystem implementation.

Keys are generated here, never derived from anything a client sent (a UID,
a file name). A blob is durable once ``put_file`` returns: its bytes and its
directory entry have been fsynced.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO, Protocol


def new_key() -> str:
    """A fresh, unguessable storage key (32 hex characters).

    The first 6 digits count minutes, so the blobs of one batch share a
    folder and one directory fsync makes them all durable; the other 26 are
    random.
    """
    minute = int(time.time() // 60) & 0xFFFFFF
    return f"{minute:06x}{secrets.token_hex(13)}"


def _is_key(key: str) -> bool:
    return len(key) == 32 and all(c in "0123456789abcdef" for c in key)


class BlobStore(Protocol):
    """Where DICOM objects are kept, by server-generated key."""

    def staging_dir(self) -> Path:
        """A folder on the store's filesystem for files that ``put_file`` will adopt."""
        ...

    def put_file(self, source: Path, *, sync_dir: bool = True) -> str:
        """Adopt ``source`` (fsynced by the caller) under a new key; return the key."""
        ...

    def sync(self, keys: Iterable[str]) -> None:
        """Make the directory entries of ``keys`` durable (after put_file(sync_dir=False))."""
        ...

    def path(self, key: str) -> Path:
        """The local path of a blob, for ranged reads and sendfile."""
        ...

    def open(self, key: str) -> BinaryIO:
        """Open a blob for reading."""
        ...

    def read_range(self, key: str, start: int, length: int) -> bytes:
        """Read ``length`` bytes at ``start``."""
        ...

    def delete(self, key: str) -> None:
        """Remove a blob; a missing blob is not an error."""
        ...


def fsync_file(path: Path) -> None:
    """Flush a file's data to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the entries of a directory (new names, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileBlobStore:
    """Blobs as files under ``root/<minute>/<key>``, staged in ``root/.staging``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._staging = root / ".staging"
        self._staging.mkdir(parents=True, exist_ok=True)

    def staging_dir(self) -> Path:
        return self._staging

    def new_staging_file(self) -> tuple[int, Path]:
        """Create an empty staging file; returns an open descriptor and its path."""
        fd, name = tempfile.mkstemp(dir=self._staging, prefix="in-")
        return fd, Path(name)

    def path(self, key: str) -> Path:
        if not _is_key(key):
            raise ValueError(f"not a blob key: {key!r}")
        return self.root / key[:6] / key

    def put_file(self, source: Path, *, sync_dir: bool = True) -> str:
        key = new_key()
        target = self.path(key)
        self._make_dirs(target.parent)
        os.rename(source, target)
        if sync_dir:
            fsync_dir(target.parent)
        return key

    def _make_dirs(self, folder: Path) -> None:
        """Create ``folder`` durably: a new folder's own entry in its parent is
        fsynced too, or a power cut could lose the folder and every blob in it
        even after the blobs' own directory was synced."""
        if folder.is_dir():
            return
        try:
            folder.mkdir()
        except FileExistsError:
            return  # made by a concurrent writer, which syncs it
        fsync_dir(folder.parent)

    def sync(self, keys: Iterable[str]) -> None:
        for folder in {self.path(k).parent for k in keys}:
            fsync_dir(folder)

    def open(self, key: str) -> BinaryIO:
        return open(self.path(key), "rb")

    def read_range(self, key: str, start: int, length: int) -> bytes:
        fd = os.open(self.path(key), os.O_RDONLY)
        try:
            return os.pread(fd, length, start)
        finally:
            os.close(fd)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(key))

    def clear_staging(self, older_than: float = 3600.0) -> None:
        """Remove leftovers of interrupted uploads (called at start-up).

        Only old files go: another process sharing the store may be mid-upload.
        """
        limit = time.time() - older_than
        for entry in self._staging.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if entry.stat().st_mtime < limit:
                    entry.unlink()
