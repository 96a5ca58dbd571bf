"""Appending a received object to its file past the page cache (O_DIRECT).

A received instance is written once and is seldom read again soon. Copying it
into the page cache costs the processor more than anything else done per
byte, and fsync then writes those pages to the device anyway; on a virtual
machine, page-cache pages never used before cost several times more still.
Written with O_DIRECT, the bytes go from an aligned buffer of ours to the
device, and the fsync that follows has only metadata left to flush.

(A C-STORE over one association is a chain of requests each waiting for its
response, and there the direct writes' own round trips to the device cost
more than the copies they save: the DIMSE receiver writes through the page
cache.)

The bytes are gathered in aligned buffers of ``CHUNK`` bytes (``Gatherer``,
on the thread receiving them) and each buffer is written whole
(``DirectWriter``, on a writer thread). A file's first ``HEAD`` bytes still
go through the page cache: they hold the header of most instances, which
ingest reads back at once (a first read of the same size; a longer header is
read from the device). The last, partial block is padded and the file cut
back to its size. Where the filesystem refuses O_DIRECT (tmpfs, say), the
file is written through the page cache as before, and a direct write refused
as such is done again through the page cache: the file holds the same bytes
either way.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import threading
from dataclasses import dataclass

BLOCK = 4096  # the alignment O_DIRECT needs, of offsets, lengths and buffers
HEAD = 16 * 1024  # bytes written through the page cache (a multiple of BLOCK)
CHUNK = 1024 * 1024  # bytes per buffer and direct write (a multiple of BLOCK)
_DIRECT = getattr(os, "O_DIRECT", 0)


class _Buffers:
    """Aligned buffers (anonymous maps start on a page), kept for reuse."""

    KEEP = 16  # 16 MiB at most kept per process

    def __init__(self) -> None:
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()
        self.made = 0  # buffers made so far: what memory they took at most

    def take(self) -> mmap.mmap:
        with self._lock:
            if self._free:
                return self._free.pop()
            self.made += 1
        return mmap.mmap(-1, CHUNK)

    def give(self, buffer: mmap.mmap) -> None:
        with self._lock:
            if len(self._free) < self.KEEP:
                self._free.append(buffer)
                return
        with contextlib.suppress(BufferError):  # a view of it still alive: left to the collector
            buffer.close()


_buffers = _Buffers()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _put(fd: int, data: memoryview, offset: int, size: int) -> None:
    """Write ``data`` (``size`` bytes of it data, the rest padding) at
    ``offset`` of the O_DIRECT file ``fd``. A write refused as direct is done
    through the page cache instead, on a description of the same file opened
    without O_DIRECT."""
    try:
        _pwrite_all(fd, data, offset)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        plain = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY)
        try:
            _pwrite_all(plain, data[:size], offset)
        finally:
            os.close(plain)


@dataclass(frozen=True)
class Filled:
    """Bytes gathered to be written: ``buffer[start:end]`` belongs at file
    offset ``base + start`` (``base`` is a multiple of BLOCK, so an aligned
    offset in the file is an aligned place in the buffer)."""

    buffer: mmap.mmap
    base: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start

    def give_back(self) -> None:
        """Return the buffer to the pool, written or not."""
        _buffers.give(self.buffer)


class Gatherer:
    """Collects the bytes appended from file offset ``position`` on into
    aligned buffers of CHUNK bytes, on the thread that receives them. ``add``
    returns the buffers it filled, ``rest`` the last, partial one; each is
    then the ``DirectWriter``'s, which gives it back to the pool."""

    def __init__(self, position: int = 0) -> None:
        self._base = position - position % BLOCK
        self._start = self._fill = position % BLOCK
        self._buffer: mmap.mmap | None = None

    def add(self, data: bytes | bytearray | memoryview) -> list[Filled]:
        filled: list[Filled] = []
        with memoryview(data) as whole:
            view = whole.cast("B")
            while view:
                if self._buffer is None:
                    self._buffer = _buffers.take()
                n = min(CHUNK - self._fill, len(view))
                self._buffer[self._fill:self._fill + n] = view[:n]
                self._fill += n
                view = view[n:]
                if self._fill == CHUNK:
                    filled.append(self._hand_over())
        return filled

    def rest(self) -> Filled | None:
        """The bytes gathered and not yet handed over, if any."""
        return self._hand_over() if self._buffer is not None else None

    def abandon(self) -> None:
        """Give the buffer back without writing it (the file is being dropped)."""
        if self._buffer is not None:
            _buffers.give(self._buffer)
            self._buffer = None

    def _hand_over(self) -> Filled:
        assert self._buffer is not None
        filled = Filled(self._buffer, self._base, self._start, self._fill)
        self._buffer = None
        self._base += CHUNK
        self._start = self._fill = 0
        return filled


class DirectWriter:
    """Writes what a ``Gatherer`` filled to the open file ``fd``, in order,
    on one thread: up to ``HEAD`` (or the first aligned offset past where
    appending began) through the page cache, the rest with O_DIRECT where the
    file allows it. ``fd`` is left open; OSError as ``os.pwrite`` raises it
    (a full disk, say)."""

    def __init__(self, fd: int, position: int = 0) -> None:
        self._fd = fd
        self._head_end = max(HEAD, -(-position // BLOCK) * BLOCK)
        self._direct: bool | None = None if _DIRECT else False  # None: not tried yet

    def put(self, filled: Filled, *, last: bool = False) -> None:
        """Write ``filled`` and give its buffer back; with ``last``, the file
        then holds exactly what was appended, and is out of direct mode."""
        try:
            with memoryview(filled.buffer) as view:
                self._write(view, filled, last)
        finally:
            filled.give_back()
            if last:
                self.done()

    def _write(self, view: memoryview, filled: Filled, last: bool) -> None:
        base, start, end = filled.base, filled.start, filled.end
        cached = max(start, min(end, self._head_end - base))
        if cached > start:
            _pwrite_all(self._fd, view[start:cached], base + start)
        if cached == end:
            return
        if not self._enter_direct():
            _pwrite_all(self._fd, view[cached:end], base + cached)
            return
        padded = -(-end // BLOCK) * BLOCK  # only the last buffer ends unaligned
        view[end:padded] = bytes(padded - end)
        _put(self._fd, view[cached:padded], base + cached, end - cached)
        if padded > end:
            os.ftruncate(self._fd, base + end)

    def _enter_direct(self) -> bool:
        if self._direct is None:
            try:
                flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
                fcntl.fcntl(self._fd, fcntl.F_SETFL, flags | _DIRECT)
                self._direct = True
            except OSError:
                self._direct = False
        return self._direct

    def done(self) -> None:
        """Leave direct mode (the file's last bytes are written)."""
        if self._direct:
            self._direct = False
            flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
            fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~_DIRECT)
