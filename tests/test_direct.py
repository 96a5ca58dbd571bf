"""Appending received objects past the page cache: the file holds exactly the
bytes written, however they were split, where the filesystem takes O_DIRECT,
where it does not (tmpfs), and where a direct write is refused."""

from __future__ import annotations

import fcntl
import mmap
import os
import random
from pathlib import Path

import pytest

from lightbox.storage import direct
from lightbox.storage.direct import BLOCK, CHUNK, HEAD, DirectWriter, Gatherer

SIZES = [0, 1, 100, HEAD - 1, HEAD, HEAD + 1, HEAD + CHUNK, HEAD + CHUNK + 1,
         HEAD + 3 * CHUNK - 5, 2_500_001]
PIECES = [1, 7, BLOCK, 65536, 300_001, 1 << 20]


def _folders(tmp_path: Path) -> list[Path]:
    """The test's folder (on disk) and, where there is one, a tmpfs folder."""
    found = [tmp_path]
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        found.append(shm)
    return found


def _append(path: Path, prefix: bytes, data: bytes, rng: random.Random) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, prefix)
        gatherer, writer = Gatherer(len(prefix)), DirectWriter(fd, len(prefix))
        sent = 0
        while sent < len(data):
            n = rng.choice(PIECES)
            for filled in gatherer.add(data[sent:sent + n]):
                writer.put(filled)
            sent += n
        rest = gatherer.rest()
        if rest is not None:
            writer.put(rest, last=True)
        else:
            writer.done()
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT, "finish leaves direct mode"
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("size", SIZES)
def test_the_file_holds_exactly_what_was_written(tmp_path: Path, size: int) -> None:
    rng = random.Random(size)
    for folder in _folders(tmp_path):
        for prefix in (b"", bytes(132), b"m" * 70_000):
            data = rng.randbytes(size)
            path = folder / f"lightbox-direct-{os.getpid()}-{size}-{len(prefix)}"
            try:
                _append(path, prefix, data, rng)
                assert path.read_bytes() == prefix + data, (folder, len(prefix))
            finally:
                path.unlink(missing_ok=True)


def test_past_the_head_writes_are_direct_where_the_filesystem_allows(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
        except OSError:
            pytest.skip("this filesystem does not take O_DIRECT")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        gatherer, writer = direct.Gatherer(), direct.DirectWriter(fd)
        assert gatherer.add(bytes(HEAD)) == []  # gathered, nothing written yet
        (filled,) = gatherer.add(bytes(CHUNK - HEAD) + b"x")
        writer.put(filled)
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT  # past the head
        assert (tmp_path / "f").read_bytes() == bytes(CHUNK)  # the head was written too
        rest = gatherer.rest()
        assert rest is not None and rest.size == 1
        writer.put(rest, last=True)
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == bytes(CHUNK) + b"x"


def test_a_direct_write_refused_is_done_through_the_page_cache(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
        except OSError:
            pytest.skip("this filesystem does not take O_DIRECT")
        buffer = mmap.mmap(-1, CHUNK)
        buffer[:5] = b"hello"
        # An offset that is not aligned: the kernel refuses the direct write.
        with memoryview(buffer) as view:
            direct._put(fd, view[:BLOCK], 3, 5)
        buffer.close()
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(3) + b"hello"


def test_a_failed_write_is_raised_and_the_buffer_given_back(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        gatherer = Gatherer()
        (filled,) = gatherer.add(bytes(CHUNK))
        with pytest.raises(OSError):
            DirectWriter(fd).put(filled)
        gatherer.abandon()
    finally:
        os.close(fd)
    assert path.read_bytes() == b""
