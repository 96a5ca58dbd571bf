"""Blob stores: a small interface and the filesystem implementation.

Keys are generated here, never derived from anything a client sent (a UID,
a file name). A blob is durable once ``put_file`` returns: its bytes and its
directory entry have been fsynced.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
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
    return len(key) == 32 and _is_hex(key)


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


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

    def prefetch(self, keys: Iterable[str]) -> None:
        """Start reading blobs that are about to be read (a hint: never raises)."""
        ...

    def delete(self, key: str) -> None:
        """Remove a blob; a missing blob is not an error."""
        ...

    def listing(self) -> Iterator[tuple[str, int, float]]:
        """Every blob, in key order: its key, size, and when it became a blob
        (or last changed: a file's ctime, which its rename into place sets)."""
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
    """Blobs as files under ``root/<minute>/<key>``, staged in ``root/.staging``
    (where empty files made ahead wait too: see SpareFiles)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._prefix = os.fspath(root) + os.sep
        self._staging = root / ".staging"
        self._staging.mkdir(parents=True, exist_ok=True)
        self._spares = SpareFiles(self._staging)

    def staging_dir(self) -> Path:
        return self._staging

    def new_staging_file(self) -> tuple[int, Path]:
        """An empty staging file: an open descriptor (for writing) and its path."""
        return self._spares.take()

    def staged(self) -> list[Path]:
        """The files in staging other than the spares made ahead: uploads under
        way, or what an interrupted one left behind."""
        listed = list(self._staging.iterdir())
        waiting = self._spares.waiting()  # after: a spare is named here before it is made
        return [p for p in listed if p.name not in waiting]

    def path(self, key: str) -> Path:
        if not _is_key(key):
            raise ValueError(f"not a blob key: {key!r}")
        return self.root / key[:6] / key

    def file_name(self, key: str) -> str:
        """``path(key)`` as a string, made without pathlib (frames are served
        by the thousand a second, and building a Path is a fair part of one)."""
        if not _is_key(key):
            raise ValueError(f"not a blob key: {key!r}")
        return f"{self._prefix}{key[:6]}{os.sep}{key}"

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

    def prefetch(self, keys: Iterable[str]) -> None:
        # The kernel reads them into the page cache in the background: the
        # disk works on the next blobs while the current one is sent.
        for key in keys:
            with contextlib.suppress(OSError):
                fd = os.open(self.path(key), os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
                finally:
                    os.close(fd)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(key))

    def listing(self) -> Iterator[tuple[str, int, float]]:
        # Keys sort by their folder first (the folder is the key's first six
        # digits), so one folder at a time is enough to keep in memory.
        # Anything else in the tree (other names, links, folders) is not a blob.
        with os.scandir(self.root) as top:
            folders = sorted(e.name for e in top if len(e.name) == 6 and _is_hex(e.name)
                             and e.is_dir(follow_symlinks=False))
        for folder in folders:
            found = []
            with contextlib.suppress(FileNotFoundError), os.scandir(self.root / folder) as it:
                for entry in it:
                    if not (_is_key(entry.name) and entry.name.startswith(folder)
                            and entry.is_file(follow_symlinks=False)):
                        continue
                    with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                        st = entry.stat(follow_symlinks=False)
                        found.append((entry.name, st.st_size, st.st_ctime))
            found.sort()
            yield from found

    def close(self) -> None:
        """Remove the spare files this process made ahead (see ``SpareFiles``)."""
        self._spares.close()

    def clear_staging(self, older_than: float = 3600.0) -> None:
        """Remove leftovers of interrupted uploads (called at start-up).

        Only old files go: another process sharing the store may be mid-upload.
        """
        limit = time.time() - older_than
        # .spare: where spares waited in earlier versions.
        for folder in (self._staging, self.root / ".spare"):
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat().st_mtime < limit:
                        entry.unlink()


class SpareFiles:
    """Empty staging files made ahead, on a thread of their own.

    Creating a file costs a few hundred microseconds on some filesystems (the
    allocation of its inode), and a file is created for every instance
    received, in the thread that receives it: the event loop for STOW-RS, the
    association's thread for C-STORE. The spares are made in the staging
    folder itself, so taking one costs nothing on the filesystem (moving it
    there from a folder of its own cost as much as making it: a rename from
    one folder to another takes the filesystem-wide rename lock). The first
    take starts the thread, so a process that never receives never makes any;
    what it made and did not use is removed when it exits. A spare waits at
    most ``MAX_AGE`` seconds, well inside the age at which start-up sweeps
    leftovers.
    """

    KEEP = 16  # files made ahead
    MAX_AGE = 600.0

    def __init__(self, staging: Path) -> None:
        self._staging = staging
        self._lock = threading.Lock()
        self._ready: deque[tuple[int, str, float]] = deque()
        self._making: set[str] = set()  # names of spares being made
        self._wanted = threading.Event()
        self._pid = 0  # the process whose thread fills ``_ready``
        self._closed = False

    def take(self) -> tuple[int, Path]:
        """An empty staging file (open for writing) and its path."""
        with self._lock:
            if not self._closed and self._pid != os.getpid():  # first take here (or in a fork)
                self._pid = os.getpid()
                self._ready = deque()
                threading.Thread(target=self._fill, name="spare-files", daemon=True).start()
                atexit.register(self.close)
            spare = self._ready.popleft() if self._ready else None
        self._wanted.set()
        if spare is not None:
            fd, name, made = spare
            # st_nlink 0: removed meanwhile (by hand, say), though still open.
            if time.monotonic() - made < self.MAX_AGE and os.fstat(fd).st_nlink > 0:
                return fd, self._staging / name
            self._remove([spare])
        name = self._new_name()
        return self._create(name), self._staging / name

    def waiting(self) -> set[str]:
        """The names of the spares not taken (or still being made)."""
        with self._lock:
            return {name for _fd, name, _made in self._ready} | self._making

    @staticmethod
    def _new_name() -> str:
        return f"in-{secrets.token_hex(16)}"  # 128 random bits: unique in the folder

    def _create(self, name: str) -> int:
        return os.open(self._staging / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)

    def _fill(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            now = time.monotonic()
            with self._lock:
                if self._closed:
                    return
                stale = [s for s in self._ready if now - s[2] >= self.MAX_AGE]
                for spare in stale:
                    self._ready.remove(spare)
                missing = self.KEEP - len(self._ready)
            self._remove(stale)
            for _ in range(missing):
                name = self._new_name()
                with self._lock:
                    self._making.add(name)
                try:
                    fd = self._create(name)
                except OSError:
                    with self._lock:
                        self._making.discard(name)
                    break  # the folder is gone or full: takes make their own and report it
                with self._lock:
                    self._making.discard(name)
                    if not self._closed:
                        self._ready.append((fd, name, time.monotonic()))
                        continue
                self._remove([(fd, name, 0.0)])
                return

    def close(self) -> None:
        """Stop making spares and remove those made (by this process, not by
        the one it was forked from); later takes make their file themselves."""
        with self._lock:
            self._closed = True
            if self._pid != os.getpid():
                return
            spares, self._ready = self._ready, deque()
        self._wanted.set()
        self._remove(spares)

    def _remove(self, spares: Iterable[tuple[int, str, float]]) -> None:
        for fd, name, _made in spares:
            os.close(fd)
            (self._staging / name).unlink(missing_ok=True)
