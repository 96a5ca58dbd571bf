"""Parsing Accept headers into (media type, parameters) choices, best first."""

from __future__ import annotations

from dataclasses import dataclass

from lightbox.web.multipart import parse_content_type

MAX_ACCEPT_ITEMS = 64


@dataclass(frozen=True)
class Choice:
    media_type: str
    type: str | None
    transfer_syntax: str | None
    q: float


def _split(header: str) -> list[str]:
    items: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in header:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    return [i.strip() for i in items if i.strip()][:MAX_ACCEPT_ITEMS]


def parse_accept(header: str | None) -> list[Choice]:
    """Choices in the order of preference (q, then as written); ``*/*`` when absent."""
    if not header:
        return [Choice("*/*", None, None, 1.0)]
    choices = []
    for item in _split(header):
        media, params = parse_content_type(item)
        try:
            q = float(params.get("q", "1"))
        except ValueError:
            q = 1.0
        if q <= 0:
            continue
        ctype = params.get("type")
        choices.append(
            Choice(media, ctype.lower() if ctype else None, params.get("transfer-syntax"), q)
        )
    return sorted(choices, key=lambda c: -c.q)
