"""Reading ``multipart/related`` (RFC 2046, RFC 2387) for STOW-RS: each body
part of an async byte stream streamed into its own file (see ``multipart``
for the framing, ``part_files`` for how the bytes reach the disk)."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from pathlib import Path

from lightbox.errors import BadRequest, TooLarge
from lightbox.web.multipart import TOKEN_RE, check_boundary, parse_content_type
from lightbox.web.part_files import Backlog, BodyFile, done

# Transport padding (whitespace after a boundary) is unbounded in RFC 2046;
# beyond this many bytes the line is taken as body data rather than buffered.
_MAX_PADDING = 256


@dataclass
class Part:
    """One body part of a multipart message, its body spooled to a file.

    ``headers`` maps lower-cased header names to values (stripped; repeated
    headers joined with ", "). ``path`` is a file of ``size`` bytes that the
    caller owns and must move or delete: closed and fsynced, unless the parts
    were read with ``wait=False``; then ``written`` is done (or raises the
    OSError of a failed write) once the whole body is in the file, and
    ``synced`` once the file is also fsynced and closed (or raises the
    OSError of the write or of the fsync).
    """

    headers: dict[str, str]
    path: Path
    size: int
    written: Future[None] = field(default_factory=done)
    synced: Future[None] = field(default_factory=done)

    @property
    def content_type(self) -> str:
        """The part's media type, lower-cased and without parameters; "" if absent."""
        return parse_content_type(self.headers.get("content-type", ""))[0]


_State = Enum("_State", "PREAMBLE HEADERS BODY DONE")
# After a ``\n--boundary`` match: another part follows (NEXT), the close delimiter
# (CLOSE), or not a delimiter after all, so the bytes are body data (DATA).
_Verdict = Enum("_Verdict", "NEXT CLOSE DATA")


def _classify(buf: bytearray, after: int) -> tuple[_Verdict, int] | None:
    """Decide what follows a ``\\n--boundary`` match ending at ``after``.

    Returns (NEXT, index of the boundary line's final LF), (CLOSE, index just
    after "--"), (DATA, -1), or None when more bytes are needed to tell.
    """
    head = buf[after : after + 2]
    if head == b"--":
        return _Verdict.CLOSE, after + 2
    if bytes(head) in (b"", b"-"):
        return None
    limit = after + _MAX_PADDING + 2
    newline = buf.find(b"\n", after, limit)
    if newline < 0:
        tail = bytes(buf[after:limit])
        # Why: only whitespace, optionally ending in CR, can still become padding + CRLF.
        if len(tail) > _MAX_PADDING + 1 or tail.rstrip(b"\r").strip(b" \t"):
            return _Verdict.DATA, -1
        return None
    if bytes(buf[after:newline]).removesuffix(b"\r").strip(b" \t"):
        return _Verdict.DATA, -1
    return _Verdict.NEXT, newline


def _parse_header_block(block: bytes) -> dict[str, str]:
    """Parse header lines (LF or CRLF separated) into a lower-cased dict.

    Continuation lines (leading whitespace) are unfolded. Raises BadRequest on
    a line that is not ``name: value``.
    """
    headers: dict[str, str] = {}
    if not block:
        return headers
    last = ""
    # Why latin-1: it maps every byte, so odd bytes give a clear header error, not a crash.
    for raw in block.decode("latin-1").split("\n"):
        line = raw.removesuffix("\r")
        if line[:1] in (" ", "\t") and last:
            headers[last] = f"{headers[last]} {line.strip()}".strip()
            continue
        name, colon, value = line.partition(":")
        if not colon or not TOKEN_RE.fullmatch(name):
            raise BadRequest(f"malformed multipart part header line: {line[:80]!r}")
        last = name.lower()
        value = value.strip()
        headers[last] = f"{headers[last]}, {value}" if last in headers else value
    return headers


class _Parser:
    """Push parser: ``feed`` chunks, then call ``next_part`` until it returns None.

    The buffer starts with a synthetic LF so that an opening boundary at the
    very start of the body is found by the same ``\\n--boundary`` search as
    every later delimiter. Consumed bytes are deleted from the buffer front.
    ``_scan`` is where the next search may start (everything before it was
    already searched), so tiny chunks do not cause quadratic rescans.
    """

    def __init__(
        self, boundary: bytes, new_file: Callable[[], tuple[int, Path]],
        limits: tuple[int, int, int],
    ) -> None:
        self._delim = b"\n--" + boundary
        self._new_file = new_file
        self._max_part_size, self._max_parts, self._max_header_bytes = limits
        self._buf = bytearray(b"\n")
        self._scan = 0
        self._state = _State.PREAMBLE
        self._count = 0  # parts started so far, including the one in progress
        self._file: BodyFile | None = None
        self._backlog = Backlog()
        self._part = Part({}, Path(), 0)

    def feed(self, data: bytes) -> None:
        """Append a chunk; after the close delimiter the epilogue is dropped."""
        if self._state is not _State.DONE:
            self._buf += data

    def next_part(self) -> tuple[BodyFile, Part] | None:
        """Advance over buffered bytes; return a finished part or None for more data.

        The returned file has been given the whole body but is not yet written,
        fsynced or closed; it and the part's path now belong to the caller.
        """
        while self._state is not _State.DONE:
            if self._state is _State.BODY:
                return self._read_body()
            step = self._skip_preamble if self._state is _State.PREAMBLE else self._read_headers
            if not step():
                return None
        return None

    def finish(self) -> None:
        """Check that the stream ended after the close delimiter."""
        if self._state is _State.PREAMBLE:
            raise BadRequest("no opening multipart boundary found in the request body")
        if self._state is not _State.DONE:
            raise BadRequest("multipart body ended before the closing boundary")

    def backlog(self) -> Future[None] | None:
        """What to wait for before reading on (see ``Backlog.behind``)."""
        return self._backlog.behind()

    def abort(self) -> None:
        """Close and delete the file of a part in progress, if any."""
        if self._file is not None:
            self._file.discard()
            self._file = None

    def _start_part(self, verdict: _Verdict, end: int) -> None:
        """Enter HEADERS (keeping the boundary line's LF) or DONE after a boundary."""
        if verdict is _Verdict.CLOSE:
            self._state = _State.DONE
            self._buf.clear()
            return
        self._count += 1
        del self._buf[:end]
        self._scan = 0
        self._state = _State.HEADERS

    def _skip_preamble(self) -> bool:
        """Find the opening boundary; return False if more data is needed."""
        buf = self._buf
        while True:
            idx = buf.find(self._delim, self._scan)
            if idx < 0:
                # Why: keep only what could be the start of a boundary split across chunks.
                del buf[: max(0, len(buf) - len(self._delim) + 1)]
                self._scan = 0
                return False
            verdict = _classify(buf, idx + len(self._delim))
            if verdict is None:
                del buf[:idx]
                self._scan = 0
                return False
            if verdict[0] is not _Verdict.DATA:
                self._start_part(*verdict)
                return True
            self._scan = idx + 1

    def _read_headers(self) -> bool:
        """Parse the header block and open the body file; False if more data is needed.

        The buffer starts at the LF ending the boundary line, so both an empty
        header block and the end of a non-empty one are a LF and a blank line.
        """
        # Why here, not at the delimiter: the previous part must be handed over first.
        if self._count > self._max_parts:
            raise TooLarge(f"multipart body has more than {self._max_parts} parts")
        buf, limit = self._buf, self._max_header_bytes + 1
        found = [
            (idx, len(blank))
            for blank in (b"\n\r\n", b"\n\n")
            if (idx := buf.find(blank, self._scan, limit)) >= 0
        ]
        if not found:
            if len(buf) >= limit:
                raise BadRequest(f"multipart part header block exceeds {limit - 1} bytes")
            self._scan = max(0, len(buf) - 2)
            return False
        idx, length = min(found)
        headers = _parse_header_block(bytes(buf[1:idx]))
        del buf[: idx + length]
        self._scan = 0
        fd, path = self._new_file()
        self._part = Part(headers, path, 0)
        self._file = BodyFile(fd, path, self._backlog)
        self._state = _State.BODY
        return True

    def _read_body(self) -> tuple[BodyFile, Part] | None:
        """Stream body bytes to the part file; return the part once its delimiter is seen."""
        buf, length = self._buf, len(self._delim)
        while True:
            idx = buf.find(self._delim, self._scan)
            if idx < 0:
                # Why: hold back a possible partial delimiter and the CR before it.
                self._write(len(buf) - length)
                self._scan = max(0, len(buf) - length + 1)
                return None
            verdict = _classify(buf, idx + length)
            if verdict is None:
                self._scan = idx - self._write(idx - 1)
                return None
            if verdict[0] is not _Verdict.DATA:
                break
            self._scan = idx + 1
        # The CR of a CRLF delimiter is not body data; a bare LF delimiter has none.
        written = self._write(idx - 1 if idx > 0 and buf[idx - 1] == 0x0D else idx)
        assert self._file is not None
        finished, self._file = (self._file, self._part), None
        self._start_part(verdict[0], verdict[1] - written)
        return finished

    def _write(self, count: int) -> int:
        """Move ``count`` bytes (if positive) from the buffer front to the part file."""
        if count <= 0:
            return 0
        assert self._file is not None
        self._part.size += count
        if self._part.size > self._max_part_size:
            raise TooLarge(
                f"multipart part {self._count} exceeds the limit of {self._max_part_size} bytes"
            )
        with memoryview(self._buf) as view:
            self._file.write(view[:count])
        del self._buf[:count]
        return count


def _spool_file(folder: Path) -> tuple[int, Path]:
    fd, name = tempfile.mkstemp(dir=folder, prefix="part-")
    return fd, Path(name)


async def _seal(file: BodyFile, part: Part, wait: bool) -> Part:
    """Close a finished part: written, fsynced and closed on its writer thread,
    which ``wait`` waits for (deleting the file if that failed); else it is
    handed over at once, its ``written`` and ``synced`` still under way."""
    part.written, part.synced = file.close()
    if not wait:
        return part
    try:
        await asyncio.wrap_future(part.synced)
    except BaseException:
        part.path.unlink(missing_ok=True)
        raise
    return part


async def iter_parts(
    chunks: AsyncIterable[bytes],
    boundary: str,
    *,
    spool_dir: Path,
    max_part_size: int,
    max_parts: int,
    max_header_bytes: int = 16384,
    wait: bool = True,
    new_file: Callable[[], tuple[int, Path]] | None = None,
) -> AsyncIterator[Part]:
    """Yield the parts of a ``multipart/related`` body streamed as ``chunks``.

    ``boundary`` is the Content-Type parameter (without the leading "--").
    Preamble and epilogue are skipped (they are not buffered but are read, so
    the caller must cap the total request size). Delimiter lines may end in
    CRLF or a bare LF. Each part body goes to a new ``part-*`` file in
    ``spool_dir`` (or made by ``new_file``, which returns an open descriptor and
    the path of an empty file), fsynced and closed before the part is yielded
    (unless ``wait`` is False); the caller then owns that file. On any error
    or cancellation the file of the part in progress is deleted; files of
    parts already yielded are left to the caller.

    Raises BadRequest for a missing or invalid boundary, no opening boundary,
    a body that ends before the close delimiter, or a header block that is
    malformed or larger than ``max_header_bytes``. Raises TooLarge when a part
    body exceeds ``max_part_size`` bytes or there are more than ``max_parts``.
    Body bytes are gathered into aligned buffers as they are parsed, and
    written, fsynced and closed on writer threads (each part's in order, and
    past its first 16 KiB with O_DIRECT where the filesystem allows) while
    the next ones are parsed; with ``wait=False`` a part is yielded before its
    last bytes are written (see ``Part.written`` and ``Part.synced``).
    """
    limits = (max_part_size, max_parts, max_header_bytes)
    if new_file is None:
        new_file = partial(_spool_file, spool_dir)
    parser = _Parser(check_boundary(boundary), new_file, limits)
    try:
        async for chunk in chunks:
            parser.feed(chunk)
            while (finished := parser.next_part()) is not None:
                yield await _seal(*finished, wait)
            if (behind := parser.backlog()) is not None:
                await asyncio.wrap_future(behind)
        parser.finish()
    finally:
        parser.abort()
