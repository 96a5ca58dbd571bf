"""Reading DICOM headers in a helper process while an upload still arrives.

A STOW-RS request is received part by part in the server's event loop; the
header of each part (parse, validation, the DICOM JSON built at ingest) is
Python work as heavy as the receiving itself. Done in the same process the
two only take turns; in one helper process per server process the header of
part *n* is read while part *n + 1* arrives, on the machine's other core.

What the helper returns is only advice to the one ingest path: a record, or
the reason a file is refused. Whenever the helper cannot answer (one core,
the helper died, the file has no preamble yet) ingest reads the header
itself, as it does for every other source.

The helper is ``python -m lightbox.services.readahead``: it reads one path a
line on its standard input and answers each, in order, with a length-prefixed
pickle on its standard output. It imports only what reading a header needs,
and it ends when its parent does (its standard input closes).
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import IO

from lightbox.dicom.instance import InstanceRecord, read_instance
from lightbox.errors import InvalidInstance

log = logging.getLogger(__name__)

Header = InstanceRecord | InvalidInstance
MAX_FAILURES = 3  # helpers that died before it is given up in this process


def read_header(path: str) -> Header | None:
    """In the helper: the file's record, why it is refused, or None when the
    ingest path must judge it itself (no Part 10 preamble, unreadable)."""
    try:
        with open(path, "rb") as fh:
            if fh.read(132)[128:132] != b"DICM":
                return None  # ingest adds the preamble first, then reads it
        return read_instance(Path(path))
    except InvalidInstance as exc:
        return exc
    except OSError:
        return None


def serve(requests: IO[bytes], answers: IO[bytes]) -> None:
    """The helper's loop: a path a line in, a length-prefixed pickle out."""
    for line in requests:
        data = pickle.dumps(read_header(line.rstrip(b"\n").decode()), pickle.HIGHEST_PROTOCOL)
        answers.write(len(data).to_bytes(4, "little") + data)
        answers.flush()


class ReadAhead:
    """The helper of this process, started on first use (or by ``start``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._waiting: deque[Future[Header | None]] = deque()
        self._failures = 0
        self._off = (os.cpu_count() or 1) < 2  # nothing to gain on one core

    def start(self) -> None:
        """Start the helper now, so the first upload does not wait for its imports."""
        with self._lock:
            self._ensure()

    def submit(self, path: Path) -> Future[Header | None] | None:
        """Ask for ``path``'s header; None when there is no helper."""
        with self._lock:
            proc = self._ensure()
            if proc is None or proc.stdin is None:
                return None
            future: Future[Header | None] = Future()
            self._waiting.append(future)
            try:
                proc.stdin.write(f"{path}\n".encode())
                proc.stdin.flush()
            except OSError:
                self._waiting.pop()
                return None  # it died: the reader thread notices and cleans up
            return future

    def _ensure(self) -> subprocess.Popen[bytes] | None:
        if self._off:
            return None
        if self._proc is None:
            try:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", __name__],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                )
            except OSError as exc:
                log.warning("header read-ahead is off: %s", exc)
                self._off = True
                return None
            threading.Thread(target=self._answers, args=(self._proc,),
                             name="readahead", daemon=True).start()
        return self._proc

    def _answers(self, proc: subprocess.Popen[bytes]) -> None:
        """Hand each answer to the oldest waiting request; when the helper ends,
        every waiting request gets None (ingest reads the header itself)."""
        assert proc.stdout is not None
        while True:
            size = proc.stdout.read(4)
            data = proc.stdout.read(int.from_bytes(size, "little")) if len(size) == 4 else b""
            if not data:
                break
            with self._lock:
                future = self._waiting.popleft()
            try:
                future.set_result(pickle.loads(data))
            except Exception:  # a bad answer is no answer
                future.set_result(None)
        proc.wait()
        with self._lock:
            if self._proc is proc:
                self._proc = None
                self._failures += 1
                self._off = self._failures >= MAX_FAILURES
                log.warning("header read-ahead helper ended (status %s)", proc.returncode)
            while self._waiting:
                self._waiting.popleft().set_result(None)

    def stop(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None and proc.stdin is not None:
            proc.stdin.close()
            proc.wait()


def outcome(future: Future[Header | None] | None) -> Header | None:
    """What the helper found (waiting for it), or None: ingest reads the header."""
    return None if future is None else future.result()


helper = ReadAhead()


if __name__ == "__main__":
    # Ctrl-C at the terminal, or a service manager stopping the server, signals
    # the whole group; the helper ends when its worker does (its input closes),
    # after any answer it is writing.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    serve(sys.stdin.buffer, sys.stdout.buffer)
