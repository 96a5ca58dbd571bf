"""``multipart/related`` (RFC 2046, RFC 2387) for DICOMweb: the framing rules,
Content-Type parameters, and writing messages.

Reading (STOW-RS) is in ``multipart_reader``: ``iter_parts`` streams each
body part of an async byte stream into its own file and yields a ``Part``
once the file is fsynced and closed (or, on request, at once, while its last
bytes are still being written and synced), ready to be renamed into a blob
store on the same filesystem. Memory use is a chunk, the header limit, a
write buffer and a few megabytes at most waiting to be written, whatever the
size (``part_files``).

Writing (WADO-RS): a message is, for every part in order,
``part_header(boundary, content_type) + body + b"\\r\\n"``, then one
``closing(boundary)``. The CRLF after each body starts the RFC 2046 delimiter
whose ``--boundary`` line follows, so ``closing`` is just ``--boundary--`` CRLF.
The message has an empty preamble and epilogue. :func:`encode_parts` builds a
whole message for small responses; large ones stream the same pieces.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Mapping

from lightbox.errors import BadRequest

# RFC 2046 5.1.1 limits a boundary to 70 characters. The character set is
# widened from bchars to any visible ASCII or space because real clients use
# characters such as '@'; the parser only needs an unambiguous ASCII byte string.
_BOUNDARY_RE = re.compile(r"[\x20-\x7e]{0,69}[\x21-\x7e]")

# One ';'-terminated parameter: ``name=value``, ``name="quoted value"``, or junk
# (no name group) that is skipped rather than failing the whole header.
_PARAM_RE = re.compile(
    r'\s*(?:([^\s=;"]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"\s*|([^;]*))|[^;]*)(?:;|\Z)',
    re.DOTALL,
)
_QUOTED_PAIR_RE = re.compile(r"\\(.)", re.DOTALL)

# RFC 9110 token characters, which is what a header field name may contain.
TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """Split a Content-Type value into its media type and parameters.

    The media type is stripped and lower-cased. Parameter names are lower-cased;
    quoted values lose their quotes and backslash escapes and may contain ';'.
    Malformed parameters (no '=') are skipped and the first of repeated names
    wins. Never raises: a caller that needs a parameter checks for it.
    """
    media, _, rest = value.partition(";")
    params: dict[str, str] = {}
    for match in _PARAM_RE.finditer(rest):
        name, quoted, bare = match.groups()
        if name is not None:
            param = (
                bare.strip().strip('"') if quoted is None else _QUOTED_PAIR_RE.sub(r"\1", quoted)
            )
            params.setdefault(name.lower(), param)
    return media.strip().lower(), params


def check_boundary(boundary: str, error: type[Exception] = BadRequest) -> bytes:
    """Return ``boundary`` as bytes, or raise ``error`` if RFC 2046 forbids it."""
    if not boundary:
        raise error("multipart boundary parameter is missing or empty")
    if len(boundary) > 70:
        raise error("multipart boundary is longer than 70 characters")
    if not _BOUNDARY_RE.fullmatch(boundary):
        raise error("multipart boundary contains invalid characters")
    return boundary.encode("ascii")


def new_boundary() -> str:
    """Return a fresh random boundary: 32 hex digits, needing no quoting.

    128 random bits make a collision with body content negligible, which is
    why bodies are not scanned for it.
    """
    return secrets.token_hex(16)


def _header_line(name: str, value: str) -> bytes:
    """Encode one header line; reject values that would break the framing."""
    if not TOKEN_RE.fullmatch(name) or "\r" in value or "\n" in value:
        raise ValueError(f"invalid multipart header {name!r}: {value!r}")
    return f"{name}: {value}\r\n".encode("ascii")


def part_header(boundary: str, content_type: str, extra: Mapping[str, str] | None = None) -> bytes:
    """Return the boundary line and headers that open a part, ending in the blank line.

    That is ``--boundary CRLF Content-Type: ... CRLF [extra headers] CRLF``.
    The body follows directly and must be followed by ``b"\\r\\n"`` (see the
    module docstring). Raises ValueError for an invalid boundary or a header
    name or value that is not ASCII or contains a line break.
    """
    lines = [b"--" + check_boundary(boundary, ValueError) + b"\r\n"]
    lines.append(_header_line("Content-Type", content_type))
    for name, value in (extra or {}).items():
        lines.append(_header_line(name, value))
    lines.append(b"\r\n")
    return b"".join(lines)


def closing(boundary: str) -> bytes:
    """Return the close delimiter ``--boundary-- CRLF``.

    It follows the ``b"\\r\\n"`` written after the last body, which supplies
    the CRLF that RFC 2046 puts in front of the delimiter. Raises ValueError
    for an invalid boundary.
    """
    return b"--" + check_boundary(boundary, ValueError) + b"--\r\n"


def encode_parts(parts: Iterable[tuple[str, bytes]], boundary: str) -> bytes:
    """Build a whole message from ``(content_type, body)`` pairs.

    For small responses only; the framing is the one in the module docstring.
    With no parts the result is only the close delimiter, which this module's
    parser accepts as an empty message (RFC 2046 itself requires one part).
    """
    pieces: list[bytes] = []
    for content_type, body in parts:
        pieces += (part_header(boundary, content_type), body, b"\r\n")
    pieces.append(closing(boundary))
    return b"".join(pieces)
