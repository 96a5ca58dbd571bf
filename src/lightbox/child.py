"""What every server child process does first (HTTP workers, DIMSE processes)."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal

from lightbox import allocator

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def start_child() -> None:
    """End with the parent, and keep large buffers in the heap (see allocator)."""
    die_with_parent()
    allocator.keep_buffers()


def die_with_parent() -> None:
    """Ask Linux for SIGTERM when the parent dies (even by kill -9), so no
    orphan keeps serving an archive that nobody supervises."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the parent's own shutdown still stops its children
    parent = multiprocessing.parent_process()
    orphaned = os.getppid() != parent.pid if parent is not None else os.getppid() == 1
    if orphaned:
        os._exit(0)  # the parent died before the request took effect
