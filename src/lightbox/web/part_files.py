"""A STOW-RS part's body written to a file of its own while the request is
still being parsed: gathered into aligned buffers, written on one of a few
writer threads (past its head, straight to the device), then fsynced and
closed there. ``Backlog`` bounds what one message may have waiting."""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from lightbox.storage.direct import CHUNK, DirectWriter, Filled, Gatherer


def done() -> Future[None]:
    done: Future[None] = Future()
    done.set_result(None)
    return done


# Body bytes are written on these threads while the event loop goes on
# parsing, each part's in the order they came on the thread it was given (the
# parts take turns): past its head a part goes straight to the device (see
# lightbox.storage.direct), and several parts' writes at once keep the device
# busier than one after the other.
_WRITERS = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"part-write-{n}")
            for n in range(4)]
_next_writer = itertools.cycle(_WRITERS)
# Memory of a message's buffers handed to the writers and not yet written,
# beyond which reading the request waits (a buffer counts whole, however few
# bytes it holds: many small parts must not pile up either): with the part
# being gathered, what memory an upload may hold.
_BACKLOG = 4 * CHUNK


class Backlog:
    """Buffer memory of one message handed to the writers and not yet
    written, over all its parts (a part that ends does not take its queued
    writes along)."""

    def __init__(self) -> None:
        self.handed = 0  # event loop only
        self.written = 0  # writer threads, under the lock
        self.lock = threading.Lock()
        self.last: Future[None] = done()  # the latest write, of any part

    def wrote(self, count: int) -> None:
        with self.lock:
            self.written += count

    def behind(self) -> Future[None] | None:
        """The write to wait for when too much waits to be written, else None."""
        return self.last if self.handed - self.written > _BACKLOG else None


class BodyFile:
    """A part's file: its bytes are gathered into aligned buffers as they are
    parsed, and each full buffer written on the part's writer thread, in order."""

    def __init__(self, fd: int, path: Path, backlog: Backlog) -> None:
        self._fd = fd
        self._writer = next(_next_writer)
        self._gatherer = Gatherer()
        self._out = DirectWriter(fd)
        self._path = path
        self._backlog = backlog
        self._error: OSError | None = None

    def write(self, data: memoryview) -> None:
        """Append ``data`` (copied: the caller keeps it)."""
        for filled in self._gatherer.add(data):
            self._hand(self._put, filled)

    def close(self) -> tuple[Future[None], Future[None]]:
        """Write the rest, fsync and close the file on the writer thread. The
        first future is done once the file holds the whole body, the second
        once it is fsynced and closed; each raises the OSError that kept it
        from being so."""
        written: Future[None] = Future()
        synced: Future[None] = Future()
        self._hand(self._close, self._gatherer.rest(), written, synced)
        return written, synced

    def discard(self) -> None:
        """Delete the file now; it is closed once what is queued for it is done."""
        self._gatherer.abandon()
        self._path.unlink(missing_ok=True)
        self._writer.submit(os.close, self._fd)

    def _hand(self, task: Callable[..., None], filled: Filled | None, *args: object) -> None:
        """Queue ``task(filled, *args)`` on the writer, counting the buffer."""
        if filled is not None:
            self._backlog.handed += CHUNK
        self._backlog.last = self._writer.submit(task, filled, *args)

    def _put(self, filled: Filled, *, last: bool = False) -> None:
        try:
            if self._error is None:
                self._out.put(filled, last=last)
            else:
                filled.give_back()
        except OSError as exc:
            self._error = exc
        finally:
            self._backlog.wrote(CHUNK)

    def _close(self, rest: Filled | None, written: Future[None], synced: Future[None]) -> None:
        try:
            self._finish(rest, written)
        except BaseException as exc:  # not an OSError: nobody must wait for ever
            for future in (written, synced):
                _settle(future, exc)
            raise
        finally:
            os.close(self._fd)
        _settle(synced, self._error)

    def _finish(self, rest: Filled | None, written: Future[None]) -> None:
        """Write the rest (``written`` tells), then fsync."""
        if rest is not None:
            self._put(rest, last=True)
        elif self._error is None:
            try:
                self._out.done()
            except OSError as exc:
                self._error = exc
        _settle(written, self._error)
        if self._error is None:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                self._error = exc


def _settle(future: Future[None], error: BaseException | None) -> None:
    """Complete ``future`` (one not done yet) with ``error`` or success."""
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
