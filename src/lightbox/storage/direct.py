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

A file's first ``HEAD`` bytes still go through the page cache: they hold the
header of most instances, which ingest reads back at once (a first read of
the same size; a longer header is read from the device). The rest is gathered in aligned
buffers and written a ``CHUNK`` at a time; the last, partial block is padded
and the file cut back to its size. Where the filesystem refuses O_DIRECT
(tmpfs, say), the file is written through the page cache as before, and a
direct write refused as such is done again through the page cache: the file
holds the same bytes either way.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import threading

BLOCK = 4096  # the alignment O_DIRECT needs, of offsets, lengths and buffers
HEAD = 16 * 1024  # bytes written through the page cache (a multiple of BLOCK)
CHUNK = 512 * 1024  # bytes per direct write (a multiple of BLOCK)
_DIRECT = getattr(os, "O_DIRECT", 0)


class _Buffers:
    """Aligned buffers (anonymous maps start on a page), kept for reuse."""

    KEEP = 32

    def __init__(self) -> None:
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self) -> mmap.mmap:
        with self._lock:
            if self._free:
                return self._free.pop()
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


def _put(fd: int, buffer: mmap.mmap, offset: int, length: int, size: int) -> None:
    """Write ``length`` bytes of ``buffer`` (``size`` of them data, the rest
    padding) at ``offset`` of the O_DIRECT file ``fd``. A write refused as
    direct is done through the page cache instead, on a description of the
    same file opened without O_DIRECT."""
    with memoryview(buffer) as view:
        try:
            _pwrite_all(fd, view[:length], offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            plain = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY)
            try:
                _pwrite_all(plain, view[:size], offset)
            finally:
                os.close(plain)


class DirectAppender:
    """Appends to the open file ``fd`` from byte ``position`` on.

    One thread calls ``write`` and then ``finish`` (the file is complete only
    after it), or ``abandon`` when the file is dropped instead; ``fd`` is left
    open. Raises OSError as ``os.write`` would (a full disk, say).
    """

    def __init__(self, fd: int, position: int = 0) -> None:
        self._fd = fd
        self._position = position  # of the next byte, in the file or the buffer
        self._buffer: mmap.mmap | None = None
        self._fill = 0
        self._direct = bool(_DIRECT)  # still to try; False once refused or left

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        if self._buffer is None:
            view = self._write_head(view)
            if not view:
                return
            if self._buffer is None:
                _pwrite_all(self._fd, view, self._position)
                self._position += len(view)
                return
        while view:
            n = min(CHUNK - self._fill, len(view))
            self._buffer[self._fill:self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill == CHUNK:
                self._send(CHUNK, CHUNK)

    def finish(self) -> None:
        """Write what is buffered: the file then holds exactly what was written."""
        try:
            fill = self._fill
            if self._buffer is not None and fill:
                padded = -(-fill // BLOCK) * BLOCK
                self._buffer[fill:padded] = bytes(padded - fill)
                self._send(padded, fill)
                if padded > fill:
                    os.ftruncate(self._fd, self._position)
        finally:
            self.abandon()
        self._leave_direct()

    def abandon(self) -> None:
        """Give the buffer back without writing it (the file is being dropped)."""
        if self._buffer is not None:
            _buffers.give(self._buffer)
            self._buffer = None
            self._fill = 0

    def _write_head(self, view: memoryview) -> memoryview:
        """Write through the page cache up to the first aligned offset at or
        past HEAD, then switch to direct writes if the file allows them;
        return the bytes not written yet."""
        if not self._direct:
            return view
        start = max(HEAD, -(-self._position // BLOCK) * BLOCK)
        n = min(start - self._position, len(view))
        if n > 0:
            _pwrite_all(self._fd, view[:n], self._position)
            self._position += n
            view = view[n:]
        if view and self._enter_direct():
            self._buffer = _buffers.take()
            self._fill = 0
        return view

    def _enter_direct(self) -> bool:
        try:
            flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
            fcntl.fcntl(self._fd, fcntl.F_SETFL, flags | _DIRECT)
        except OSError:
            self._direct = False
        return self._direct

    def _leave_direct(self) -> None:
        if self._direct:
            self._direct = False
            flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
            fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~_DIRECT)

    def _send(self, length: int, size: int) -> None:
        """Write the buffer (``length`` bytes, ``size`` of them data); it is
        then free for what follows."""
        assert self._buffer is not None
        _put(self._fd, self._buffer, self._position, length, size)
        self._position += size
        self._fill = 0
