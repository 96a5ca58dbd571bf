"""Server processes forked from one parent that has imported everything.

A spawned worker is a new interpreter: it imports the whole server stack
again, some 75 MB of private memory per process. A worker forked from a
parent that has done those imports shares their pages with the parent and
its siblings for as long as nobody writes to them. ``gc.freeze`` before each
fork keeps the collector from writing to them (it would otherwise touch every
object it scans). Forking is safe because the parent runs no other thread: it
only forks, reaps and signals.

The parent replaces a child that dies, unless it failed while starting (it
exited with an error status in its first seconds: the next one would fail the
same way, and the server stops with an error).
SIGINT and SIGTERM stop every child (SIGTERM, then SIGKILL after a grace
period), and the parent last.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

from lightbox.errors import LightboxError

log = logging.getLogger("lightbox.server")

STARTUP_SECONDS = 10.0  # a child that fails sooner failed to start
STOP_SECONDS = 15.0  # a stopped child's time to finish what it serves
POLL_SECONDS = 0.2


@dataclass
class Child:
    """One child process: ``run`` is what it does, in the forked process;
    it ends the process when it returns."""

    name: str
    run: Callable[[], None]
    pid: int = 0
    started: float = 0.0


class ChildFailed(LightboxError):
    """A child process ended while it started."""


def fork(run: Callable[[], None]) -> int:
    """Fork a process that calls ``run`` and exits (never returns into the
    caller's code, whatever ``run`` raises). Only in a process without other
    threads: a lock another thread holds would stay held in the child."""
    if threading.active_count() > 1:
        raise RuntimeError("fork with threads running: " +
                           ", ".join(t.name for t in threading.enumerate()))
    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # what is buffered is the parent's to write, not the child's too
    gc.freeze()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        run()
        code = 0
    except KeyboardInterrupt:
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        log.exception("server process %d failed", os.getpid())
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)


class Supervisor:
    """Forks ``children`` and keeps them running until SIGINT or SIGTERM."""

    def __init__(self, children: list[Child]) -> None:
        self.children = children
        self._stopping = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True

    def _start(self, child: Child) -> None:
        child.pid = fork(child.run)
        child.started = time.monotonic()

    def run(self) -> None:
        """Serve until asked to stop; raise ChildFailed when a child fails at start."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for child in self.children:
                self._start(child)
            while not self._stopping:
                time.sleep(POLL_SECONDS)
                self._reap()
        finally:
            self._stop_all()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = next((c for c in self.children if c.pid == pid), None)
            if child is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            child.pid = 0
            if self._stopping:
                continue
            if code > 0 and time.monotonic() - child.started < STARTUP_SECONDS:
                raise ChildFailed(f"{child.name} ended while starting (status {code})")
            log.warning("%s (pid %d) ended with status %d; starting another", child.name,
                        pid, code)
            self._start(child)

    def _stop_all(self) -> None:
        self._stopping = True
        running = [c for c in self.children if c.pid]
        for child in running:
            _signal(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECONDS
        while any(c.pid for c in running) and time.monotonic() < deadline:
            time.sleep(0.05)
            self._reap()
        for child in running:
            if child.pid:
                log.warning("%s (pid %d) did not stop in %.0f s: killed", child.name, child.pid,
                            STOP_SECONDS)
                _signal(child.pid, signal.SIGKILL)
                os.waitpid(child.pid, 0)
                child.pid = 0


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # ended already; reaped next
        os.kill(pid, signum)
