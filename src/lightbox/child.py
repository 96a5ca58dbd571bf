"""What every server child process does first (HTTP workers, DIMSE processes)."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal

from lightbox import allocator

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PR_SET_NAME = 15


def start_child(name: str = "", parent: int | None = None) -> None:
    """End with the parent, keep large buffers in the heap (see allocator),
    and show ``name`` as the process's name in ``ps`` and ``top``."""
    die_with_parent(parent)
    allocator.keep_buffers()
    if name:
        name_process(name)


def _prctl(option: int, value: int | bytes) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        return int(libc.prctl(option, value, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False  # not Linux


def name_process(name: str) -> None:
    """The name ``ps -o comm`` and ``top`` show (Linux keeps 15 bytes of it)."""
    _prctl(PR_SET_NAME, name.encode()[:15])


def die_with_parent(parent: int | None = None) -> None:
    """Ask Linux for SIGTERM when the parent dies (even by kill -9), so no
    orphan keeps serving an archive that nobody supervises. ``parent`` is the
    pid of the process that forked this one (a multiprocessing child knows it)."""
    _prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if parent is None:
        known = multiprocessing.parent_process()
        parent = known.pid if known is not None else None
    orphaned = os.getppid() != parent if parent is not None else os.getppid() == 1
    if orphaned:
        os._exit(0)  # the parent died before the request took effect
