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

The helper reads one path a line on its input pipe and answers each, in
order, with a length-prefixed pickle on its output pipe; it ends when its
parent does (its input closes). ``lightbox serve`` forks it from each server
process before that process starts any thread, so that it shares the
process's memory; anywhere else, and to replace a helper that died, it is a
new interpreter, ``python -m lightbox.services.readahead``, which imports only
what reading a header needs.
"""

from __future__ import annotations

import contextlib
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
from typing import IO, Any, Protocol

from lightbox.dicom.instance import InstanceRecord, read_instance
from lightbox.errors import InvalidInstance

log = logging.getLogger(__name__)

Header = InstanceRecord | InvalidInstance
MAX_FAILURES = 3  # helpers that died before it is given up in this process
MAX_WAITING = 64  # requests in the helper's queue; past that, headers are read inline


def read_header(path: str) -> Header | None:
    """In the helper: the file's record, why it is refused, or None when the
    ingest path must judge it itself (no Part 10 preamble, unreadable)."""
    try:
        with open(path, "rb") as fh:
            if fh.read(132)[128:132] != b"DICM":
                return None  # ingest adds the preamble first, then reads it
        return read_instance(Path(path))
    except InvalidInstance as exc:
        # Ingest may move the file into the blob store while this reads it (it
        # does not wait for headers still queued here), and pydicom opens the
        # file again by name: a file gone is no reason to refuse it.
        return exc if os.path.exists(path) else None
    except OSError:
        return None


class Process(Protocol):
    """What is used of the helper's process: a ``subprocess.Popen`` or a ``Forked``."""

    stdin: IO[bytes] | None
    stdout: IO[bytes] | None
    returncode: Any

    def wait(self) -> int: ...

    def kill(self) -> None: ...


class Forked:
    """A helper forked from this process, with pipes for its input and output.
    Only for a process running no other thread."""

    def __init__(self) -> None:
        from lightbox.supervisor import fork  # not in the new-interpreter helper

        requests_in, requests_out = os.pipe()
        answers_in, answers_out = os.pipe()
        parent = os.getpid()

        def run() -> None:
            os.close(requests_out)
            os.close(answers_in)
            from lightbox.child import start_child
            start_child("lightbox-header", parent)
            _ignore_stop_signals()
            with open(requests_in, "rb") as requests, open(answers_out, "wb") as answers:
                serve(requests, answers)

        self.pid = fork(run)
        os.close(requests_in)
        os.close(answers_out)
        self.stdin: IO[bytes] | None = open(requests_out, "wb")  # noqa: SIM115
        self.stdout: IO[bytes] | None = open(answers_in, "rb")  # noqa: SIM115
        self.returncode: int | None = None
        self._reaping = threading.Lock()

    def wait(self) -> int:
        # The answer thread waits for the helper when it ends, and stop() may at
        # the same time: one reaps it, the other takes its status.
        with self._reaping:
            if self.returncode is None:
                _, status = os.waitpid(self.pid, 0)
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


def _ignore_stop_signals() -> None:
    # Ctrl-C at the terminal, or a service manager stopping the server, signals
    # the whole group; the helper ends when its server process does (its input
    # closes), after any answer it is writing.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def serve(requests: IO[bytes], answers: IO[bytes]) -> None:
    """The helper's loop: a path a line in, a length-prefixed pickle out.
    An empty answer first says the helper is ready (its imports are done)."""
    answers.write(bytes(4))
    answers.flush()
    for line in requests:
        data = pickle.dumps(read_header(line.rstrip(b"\n").decode()), pickle.HIGHEST_PROTOCOL)
        answers.write(len(data).to_bytes(4, "little") + data)
        answers.flush()


class ReadAhead:
    """The helper of this process. ``lightbox serve`` starts it with each HTTP
    worker, so that the first upload does not wait for it; anywhere else the
    first upload that could use it does. Until it is ready (its imports take
    a fraction of a second), headers are read inline."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: Process | None = None
        self._ready = threading.Event()
        self._waiting: deque[Future[Header | None]] = deque()
        self._failures = 0
        self._off = (os.cpu_count() or 1) < 2  # nothing to gain on one core

    def start(self) -> None:
        """Start the helper if it is not running."""
        with self._lock:
            self._ensure()

    def fork(self) -> None:
        """Start the helper as a fork of this process, which must run no other
        thread yet (a new interpreter if it does)."""
        with self._lock:
            if self._off or self._proc is not None:
                return
            if threading.active_count() > 1:
                self._ensure()
                return
            try:
                self._adopt(Forked())
            except OSError as exc:
                log.warning("header read-ahead: cannot fork a helper (%s); starting one", exc)
                self._ensure()

    def ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the helper to be ready."""
        return self._ready.wait(timeout)

    def submit(self, path: Path) -> Future[Header | None] | None:
        """Ask for ``path``'s header; None when there is no helper (yet)."""
        with self._lock:
            proc = self._ensure()
            if proc is None or proc.stdin is None or not self._ready.is_set():
                return None
            if len(self._waiting) >= MAX_WAITING:
                return None  # it is behind: this header is read inline
            future: Future[Header | None] = Future()
            try:
                # One write of a line shorter than PIPE_BUF is all or nothing;
                # the pipe never blocks this thread (it is the event loop's).
                os.write(proc.stdin.fileno(), f"{path}\n".encode())
            except OSError:
                return None  # full (or the helper died: its reader cleans up)
            self._waiting.append(future)
            return future

    def _ensure(self) -> Process | None:
        if self._off:
            return None
        if self._proc is None:
            try:
                self._adopt(subprocess.Popen([sys.executable, "-m", __name__],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE))
            except OSError as exc:
                log.warning("header read-ahead is off: %s", exc)
                self._off = True
                return None
        return self._proc

    def _adopt(self, proc: Process) -> None:
        """Make ``proc`` this process's helper (the lock is held)."""
        assert proc.stdin is not None
        os.set_blocking(proc.stdin.fileno(), False)
        self._proc = proc
        self._waiting = deque()  # this helper's own queue of requests
        threading.Thread(target=self._answers, args=(proc, self._waiting),
                         name="readahead", daemon=True).start()

    def _answers(self, proc: Process, waiting: deque[Future[Header | None]]) -> None:
        """Hand each answer to the oldest waiting request; when the helper ends,
        every waiting request gets None (ingest reads the header itself)."""
        assert proc.stdout is not None
        if proc.stdout.read(4) != bytes(4):
            proc.kill()  # not our helper's greeting: give up on this one
        else:
            with self._lock:
                if self._proc is proc:
                    self._ready.set()
        while True:
            size = proc.stdout.read(4)
            data = proc.stdout.read(int.from_bytes(size, "little")) if len(size) == 4 else b""
            if not data:
                break
            with self._lock:
                future = waiting.popleft()
            try:
                future.set_result(pickle.loads(data))
            except Exception:  # a bad answer is no answer
                future.set_result(None)
        proc.wait()
        with self._lock:
            if self._proc is proc:
                self._proc = None
                self._ready.clear()
                self._failures += 1
                self._off = self._failures >= MAX_FAILURES
                log.warning("header read-ahead helper ended (status %s)", proc.returncode)
            while waiting:
                waiting.popleft().set_result(None)

    def stop(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
            self._ready.clear()
        if proc is not None and proc.stdin is not None:
            proc.stdin.close()
            proc.wait()


def outcome(future: Future[Header | None] | None) -> Header | None:
    """What the helper found (waiting for it), or None: ingest reads the header."""
    return None if future is None else future.result()


helper = ReadAhead()


if __name__ == "__main__":
    _ignore_stop_signals()
    serve(sys.stdin.buffer, sys.stdout.buffer)
