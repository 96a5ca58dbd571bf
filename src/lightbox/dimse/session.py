"""One association as the log sees it: who called, what was asked, how it ended."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter

from lightbox.dimse.access import Peer

log = logging.getLogger("lightbox.dimse")

_numbers = itertools.count(1)


class Session:
    """Counters of one association, summarised in one log line when it ends."""

    def __init__(self, peer: Peer) -> None:
        self.number = next(_numbers)
        self.peer = peer
        self.started = time.monotonic()
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._ended = False

    def note(self, what: str, n: int = 1) -> None:
        with self._lock:
            self._counts[what] += n

    def accepted(self, contexts: int) -> None:
        scope = "" if self.peer.known else " (unknown caller: C-ECHO and C-STORE only)"
        log.info("dicom association #%d from %s accepted, %d presentation contexts%s",
                 self.number, self.peer, contexts, scope)

    def end(self, how: str) -> None:
        """Log the outcome once (release, abort or a closed connection, whichever comes first)."""
        with self._lock:
            if self._ended:
                return
            self._ended = True
            counts = ", ".join(f"{k} {v}" for k, v in sorted(self._counts.items())) or "nothing"
        seconds = time.monotonic() - self.started
        level = logging.WARNING if how == "aborted" else logging.INFO
        log.log(level, "dicom association #%d from %s %s after %.1f s: %s",
                self.number, self.peer, how, seconds, counts)
