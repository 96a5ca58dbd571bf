"""Printing what a ``list`` command found."""

from __future__ import annotations

import sys
from collections.abc import Iterable


def print_rows(rows: Iterable[str], nothing: str) -> None:
    """One line per row on stdout; when there is none, ``nothing`` on stderr,
    so that a script reading stdout still reads no rows."""
    empty = True
    for row in rows:
        print(row)
        empty = False
    if empty:
        print(nothing, file=sys.stderr)
