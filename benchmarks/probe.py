"""How fast this machine's processor is right now.

On a shared virtual machine the processor's speed changes from one minute to
the next: the same fixed loop of Python has taken from 80 to 145 ms here
within one benchmark run. A server that is bound by the processor (Lightbox
storing over DIMSE, say) then slows down while one bound by the disk does
not. The benchmarks print this probe next to their figures so that a run can
be read with the speed it had.
"""

from __future__ import annotations

import time

LOOPS = 3_000_000


def cpu_probe_ms() -> float:
    """Milliseconds for a fixed loop of Python additions, the best of three."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        total = 0
        for i in range(LOOPS):
            total += i
        best = min(best, time.perf_counter() - started)
    return 1000 * best
