"""Tests for lightbox.web.multipart: framing, chunking, limits, cleanup, interop."""

from __future__ import annotations

import asyncio
import email
import hashlib
import os
import random
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest

from lightbox.errors import BadRequest, TooLarge
from lightbox.storage import direct
from lightbox.web import part_files
from lightbox.web.multipart import (
    closing,
    encode_parts,
    new_boundary,
    parse_content_type,
    part_header,
)
from lightbox.web.multipart_reader import Part, iter_parts

B = "Boundary_0123-abc"
BB = B.encode()
DICOM = "application/dicom"

Parsed = list[tuple[dict[str, str], bytes]]


async def _source(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def _collect(chunks: Iterable[bytes], spool: Path, boundary: str = B, **kw: int) -> Parsed:
    """Parse, read each part's file, check it against ``size`` and delete it (as a caller would)."""
    limits = {"max_part_size": 1 << 30, "max_parts": 1000} | kw
    out: Parsed = []
    async for part in iter_parts(_source(chunks), boundary, spool_dir=spool, **limits):
        assert part.path.parent == spool and part.path.name.startswith("part-")
        data = part.path.read_bytes()
        assert len(data) == part.size
        part.path.unlink()
        out.append((part.headers, data))
    return out


def parse(message: bytes | list[bytes], spool: Path, boundary: str = B, **kw: int) -> Parsed:
    chunks = [message] if isinstance(message, bytes) else message
    return asyncio.run(_collect(chunks, spool, boundary, **kw))


def bodies_of(parsed: Parsed) -> list[bytes]:
    return [body for _, body in parsed]


def tricky_bodies(boundary: bytes) -> list[bytes]:
    """Bodies full of almost-delimiters; none contains a real one (RFC 2046 forbids that)."""
    near = [
        b"",
        b"\r\n",
        b"\r",
        b"\n",
        b"\r\n--",
        b"--",
        b"x--" + boundary,
        b"\r\n--" + boundary[:-1],
        b"\r\n-" + boundary,
        b"\r\n--" + boundary[:-1] + b"\r\n",
        b"\n--" + boundary[1:],
        b"abc\r\n--" + boundary[:5] + b"\r\r\n",
        b"\r\n\r\n\r\n",
    ]
    rng = random.Random(1234)
    for _ in range(20):
        pieces = [rng.randbytes(rng.randrange(0, 300)) for _ in range(4)]
        glue = [rng.choice(near) for _ in range(4)]
        near.append(b"".join(p + g for p, g in zip(pieces, glue, strict=True)))
    return near


# --------------------------------------------------------------------------- writer


def test_writer_framing_is_exact() -> None:
    header = part_header(B, DICOM, {"Content-Location": "/studies/1"})
    assert header == (
        b"--" + BB + b"\r\nContent-Type: application/dicom\r\nContent-Location: /studies/1\r\n\r\n"
    )
    assert closing(B) == b"--" + BB + b"--\r\n"
    message = encode_parts([(DICOM, b"one"), ("text/plain", b"two")], B)
    expected = part_header(B, DICOM) + b"one\r\n" + part_header(B, "text/plain") + b"two\r\n"
    assert message == expected + closing(B)


def test_writer_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        part_header(B, "text/plain\r\nX-Injected: 1")
    with pytest.raises(ValueError):
        part_header(B, DICOM, {"Bad Name": "v"})
    with pytest.raises(ValueError):
        closing("")
    with pytest.raises(ValueError):
        part_header("x" * 71, DICOM)


def test_new_boundary_is_random_token() -> None:
    values = {new_boundary() for _ in range(100)}
    assert len(values) == 100
    for value in values:
        assert 1 <= len(value) <= 70 and value.isalnum()
        assert closing(value)


# --------------------------------------------------------------------------- round trips


def test_round_trip_tricky_and_random_bodies(tmp_path: Path) -> None:
    bodies = tricky_bodies(BB)
    message = encode_parts([(DICOM, body) for body in bodies], B)
    parsed = parse(message, tmp_path)
    assert bodies_of(parsed) == bodies
    assert all(headers == {"content-type": DICOM} for headers, _ in parsed)
    boundary = new_boundary()
    randoms = [os.urandom(n) for n in (0, 1, 2, 100, 70_000, 300_000)]
    message = encode_parts([(DICOM, body) for body in randoms], boundary)
    chunks = [message[i : i + 4099] for i in range(0, len(message), 4099)]
    assert bodies_of(parse(chunks, tmp_path, boundary)) == randoms
    assert list(tmp_path.iterdir()) == []


def test_every_split_position_and_single_bytes(tmp_path: Path) -> None:
    message = (
        b"preamble --" + BB + b"x\r\n"
        b"--" + BB + b" \t\r\n\r\n" + b"headerless\r\n--" + BB[:-1] + b"\r"
        b"\r\n--" + BB + b"\r\nContent-Type: a/b\r\nX-Y:  z \r\n\r\n\r\n--\r"
        b"\r\n--" + BB + b"--\r\nepilogue"
    )
    expected: Parsed = [
        ({}, b"headerless\r\n--" + BB[:-1] + b"\r"),
        ({"content-type": "a/b", "x-y": "z"}, b"\r\n--\r"),
    ]

    async def run_all() -> None:
        for i in range(len(message) + 1):
            assert await _collect([message[:i], message[i:]], tmp_path) == expected, i
        assert await _collect([bytes([b]) for b in message], tmp_path) == expected

    asyncio.run(run_all())
    assert list(tmp_path.iterdir()) == []


def test_large_chunks_split_anywhere(tmp_path: Path) -> None:
    """Chunks of hundreds of bytes and more (body bytes are written from the
    buffer in runs): delimiters (CRLF or bare LF, with padding),
    almost-delimiters and CRs that are body data, wherever the chunks split them."""
    bodies = [
        b"a" * 700 + b"\r\n--" + BB + b"XYZ" + b"b" * 700,
        b"\r" * 600,
        bytes(range(256)) * 4,
        b"",
        b"\n--" + BB[:-1] + b"c" * 900 + b"\r",
    ]
    message = (
        b"--" + BB + b"\r\n\r\n" + bodies[0]
        + b"\r\n--" + BB + b" \t\r\nContent-Type: a/b\r\n\r\n" + bodies[1]
        + b"\r\n--" + BB + b"\n\n" + bodies[2]
        + b"\n--" + BB + b"\r\n\r\n" + bodies[3]
        + b"\r\n--" + BB + b"\r\n\r\n" + bodies[4]
        + b"\r\n--" + BB + b"--\r\n"
    )

    async def run_all() -> None:
        for i in range(0, len(message) + 1, 7):
            assert bodies_of(await _collect([message[:i], message[i:]], tmp_path)) == bodies, i
        for size in (333, 400, 512, 1000, 1500, 4099):
            chunks = [message[i : i + size] for i in range(0, len(message), size)]
            assert bodies_of(await _collect(chunks, tmp_path)) == bodies, size

    asyncio.run(run_all())
    assert list(tmp_path.iterdir()) == []


def test_preamble_epilogue_and_padding(tmp_path: Path) -> None:
    message = (
        b"This is a preamble.\r\nIt mentions --" + BB + b" mid-line and --" + BB + b"X.\r\n"
        b"--" + BB + b"   \r\nContent-Type: text/plain\r\n\r\nhello"
        b"\r\n--" + BB + b"--  \r\nEpilogue with --" + BB + b"\r\n and garbage"
    )
    parsed = parse(message, tmp_path)
    assert parsed == [({"content-type": "text/plain"}, b"hello")]


def test_bare_lf_line_endings(tmp_path: Path) -> None:
    message = (
        b"--" + BB + b"\nContent-Type: a/b\n\nfirst\r\n--" + BB + b"\n\nsecond\n\n--" + BB + b"--"
    )
    parsed = parse(message, tmp_path)
    assert parsed == [({"content-type": "a/b"}, b"first"), ({}, b"second\n")]


def test_headers_folded_repeated_and_cased(tmp_path: Path) -> None:
    message = (
        b"--" + BB + b"\r\nCONTENT-TYPE: Application/DICOM; transfer-syntax=1.2.840.10008.1.2.1"
        b"\r\nX-Long: one\r\n  two\r\nX-Rep: a\r\nx-rep: b\r\n\r\nbody\r\n--" + BB + b"--"
    )
    [(headers, body)] = parse(message, tmp_path)
    assert headers["x-long"] == "one two" and headers["x-rep"] == "a, b"
    part = Part(headers=headers, path=tmp_path / "unused", size=len(body))
    assert part.content_type == "application/dicom"
    assert Part(headers={}, path=tmp_path, size=0).content_type == ""


def test_leading_crlf_and_empty_message(tmp_path: Path) -> None:
    assert parse(b"\r\n--" + BB + b"\r\n\r\nx\r\n--" + BB + b"--", tmp_path) == [({}, b"x")]
    assert parse(encode_parts([], B), tmp_path) == []


def test_almost_delimiter_inside_body_is_data(tmp_path: Path) -> None:
    # Invalid per RFC 2046 (a delimiter must not occur in a body) but tolerated.
    body = b"a\r\n--" + BB + b"XYZ\r\nb"
    assert bodies_of(parse(encode_parts([(DICOM, body)], B), tmp_path)) == [body]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("boundary", ["", "x" * 71, "caf\u00e9", "ends-with-space ", "a\r\nb"])
def test_invalid_boundary(tmp_path: Path, boundary: str) -> None:
    with pytest.raises(BadRequest, match="boundary"):
        parse(b"--x\r\n\r\n\r\n--x--", tmp_path, boundary)


def test_boundary_of_70_characters_is_accepted(tmp_path: Path) -> None:
    boundary = "b" * 70
    message = encode_parts([(DICOM, b"ok")], boundary)
    assert bodies_of(parse(message, tmp_path, boundary)) == [b"ok"]


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"--" + BB,
        b"no boundary here\r\n",
        b"--" + BB[:-1] + b"\r\n\r\nx\r\n",
        b"x--" + BB + b"\r\n",
    ],
)
def test_no_opening_boundary(tmp_path: Path, message: bytes) -> None:
    with pytest.raises(BadRequest, match="no opening multipart boundary"):
        parse(message, tmp_path)


@pytest.mark.parametrize(
    "message",
    [
        b"--" + BB + b"\r\nContent-Type: a/b\r\n",
        b"--" + BB + b"\r\n\r\npartial body",
        b"--" + BB + b"\r\n\r\nbody\r\n--" + BB,
        b"--" + BB + b"\r\n\r\nbody\r\n--" + BB + b"-",
        b"--" + BB + b"\r\n\r\nbody\r\n--" + BB + b"\r\n",
    ],
)
def test_truncated_body_removes_spooled_file(tmp_path: Path, message: bytes) -> None:
    with pytest.raises(BadRequest, match="ended before the closing boundary"):
        parse([message[:5], message[5:]], tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_header_block_limit(tmp_path: Path) -> None:
    block = b"Content-Type: a/b\r\n\r\n"
    message = b"--" + BB + b"\r\n" + block + b"x\r\n--" + BB + b"--"
    assert bodies_of(parse(message, tmp_path, max_header_bytes=len(block))) == [b"x"]
    with pytest.raises(BadRequest, match="header block exceeds"):
        parse(message, tmp_path, max_header_bytes=len(block) - 1)
    endless = [b"--" + BB + b"\r\n"] + [b"X-Pad: " + b"y" * 1000 + b"\r\n"] * 100
    with pytest.raises(BadRequest, match="header block exceeds 16384"):
        parse(endless, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("line", [b"no colon here", b": no name", b"bad name: v", b"\x00x: y"])
def test_malformed_header(tmp_path: Path, line: bytes) -> None:
    message = b"--" + BB + b"\r\n" + line + b"\r\n\r\nbody\r\n--" + BB + b"--"
    with pytest.raises(BadRequest, match="malformed multipart part header"):
        parse(message, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_part_size_limit(tmp_path: Path) -> None:
    message = encode_parts([(DICOM, b"a" * 100), (DICOM, b"b" * 101)], B)
    assert len(parse(message, tmp_path, max_part_size=101)) == 2
    chunks = [message[i : i + 7] for i in range(0, len(message), 7)]
    with pytest.raises(TooLarge, match="part 2 exceeds the limit of 100 bytes"):
        parse(chunks, tmp_path, max_part_size=100)
    assert list(tmp_path.iterdir()) == []


def test_part_count_limit(tmp_path: Path) -> None:
    message = encode_parts([(DICOM, b"x")] * 3, B)
    assert len(parse(message, tmp_path, max_parts=3)) == 3
    with pytest.raises(TooLarge, match="more than 2 parts"):
        parse(message, tmp_path, max_parts=2)
    assert list(tmp_path.iterdir()) == []


def test_source_failure_and_early_exit_clean_up(tmp_path: Path) -> None:
    async def failing() -> AsyncIterator[bytes]:
        yield b"--" + BB + b"\r\n\r\nsome body bytes"
        raise ConnectionResetError("client went away")

    async def consume(source: AsyncIterator[bytes]) -> None:
        async for part in iter_parts(source, B, spool_dir=tmp_path, max_part_size=99, max_parts=9):
            part.path.unlink()

    with pytest.raises(ConnectionResetError):
        asyncio.run(consume(failing()))
    assert list(tmp_path.iterdir()) == []

    async def first_only() -> Part:
        message = encode_parts([(DICOM, b"one"), (DICOM, b"two")], B)
        parts = iter_parts(_source([message]), B, spool_dir=tmp_path, max_part_size=9, max_parts=9)
        first = await anext(parts)
        await parts.aclose()  # type: ignore[attr-defined]
        return first

    first = asyncio.run(first_only())
    assert list(tmp_path.iterdir()) == [first.path] and first.path.read_bytes() == b"one"


def test_many_parts_ahead_of_a_slow_disk_stay_in_bounded_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parts handed over before their last bytes are written (``wait=False``)
    still count against what an upload may hold in memory: reading waits for
    the writers, whatever part their queued bytes belong to. The aligned
    buffers the bytes are gathered in (maps, which tracemalloc does not see)
    are counted apart."""
    body = os.urandom(256 * 1024)
    real_pwrite = os.pwrite

    def slow_pwrite(fd: int, data: Any, offset: int) -> int:
        time.sleep(0.002)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", slow_pwrite)
    buffers_before = direct._buffers.made

    async def upload() -> AsyncIterator[bytes]:
        for _ in range(100):  # 25 MB in all
            yield part_header(B, DICOM) + body + b"\r\n"
        yield closing(B)

    async def run() -> list[Part]:
        parts = []
        async for part in iter_parts(upload(), B, spool_dir=tmp_path, max_part_size=1 << 20,
                                     max_parts=100, wait=False):
            parts.append(part)
        for part in parts:
            await asyncio.wrap_future(part.written)
            await asyncio.wrap_future(part.synced)
        return parts

    tracemalloc.start()
    try:
        parts = asyncio.run(run())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"peak traced memory {peak} bytes"
    made = direct._buffers.made - buffers_before
    # What may wait to be written, the buffer being filled, one more at the turn.
    assert made * direct.CHUNK <= part_files._BACKLOG + 2 * direct.CHUNK, f"{made} buffers made"
    assert len(parts) == 100 and all(part.path.read_bytes() == body for part in parts)


def test_fifty_megabyte_part_streams_in_bounded_memory(tmp_path: Path) -> None:
    block, count = os.urandom(64 * 1024), 800
    digest = hashlib.sha256()

    async def upload() -> AsyncIterator[bytes]:
        yield part_header(B, DICOM)
        for i in range(count):
            chunk = i.to_bytes(4, "big") + block[4:]
            digest.update(chunk)
            yield chunk
        yield b"\r\n" + closing(B)

    async def run() -> list[Part]:
        limits: dict[str, Any] = {"max_part_size": 60 << 20, "max_parts": 1}
        return [part async for part in iter_parts(upload(), B, spool_dir=tmp_path, **limits)]

    tracemalloc.start()
    try:
        [part] = asyncio.run(run())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"peak traced memory {peak} bytes"
    assert part.size == count * len(block) == part.path.stat().st_size
    file_digest = hashlib.sha256()
    with part.path.open("rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            file_digest.update(piece)
    assert file_digest.digest() == digest.digest()


# --------------------------------------------------------------------------- parse_content_type


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            'multipart/related; type="application/dicom"; boundary=abc',
            ("multipart/related", {"type": "application/dicom", "boundary": "abc"}),
        ),
        (
            ' Multipart/Related ;TYPE = "application/dicom+xml" ;  Boundary="a;b=c" ',
            ("multipart/related", {"type": "application/dicom+xml", "boundary": "a;b=c"}),
        ),
        (
            'a/b; x="q\\"uote"; y=plain ; ; junk; z=',
            ("a/b", {"x": 'q"uote', "y": "plain", "z": ""}),
        ),
        ('a/b; boundary="unterminated', ("a/b", {"boundary": "unterminated"})),
        ("a/b; x=1; X=2", ("a/b", {"x": "1"})),
        ("", ("", {})),
        ("text/plain", ("text/plain", {})),
    ],
)
def test_parse_content_type(value: str, expected: tuple[str, dict[str, str]]) -> None:
    assert parse_content_type(value) == expected


# --------------------------------------------------------------------------- interoperability


def test_email_module_parses_writer_output() -> None:
    bodies = tricky_bodies(BB)
    message = encode_parts([(DICOM, body) for body in bodies], B)
    head = f'Content-Type: multipart/related; type="{DICOM}"; boundary="{B}"\r\n\r\n'
    parsed = email.message_from_bytes(head.encode() + message)
    assert parsed.is_multipart() and not parsed.defects
    parts = [part for part in parsed.walk() if part is not parsed]
    assert all(not part.defects for part in parts)
    assert [part.get_content_type() for part in parts] == [DICOM] * len(bodies)
    assert [part.get_payload(decode=True) for part in parts] == bodies


def test_dicomweb_client_round_trip(tmp_path: Path) -> None:
    web = pytest.importorskip("dicomweb_client.web")
    bodies = tricky_bodies(BB)
    message = encode_parts([(DICOM, body) for body in bodies], B)

    class Response:
        headers = {"content-type": f'multipart/related; type="{DICOM}"; boundary={B}'}
        content = message

        def __enter__(self) -> Response:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def iter_content(self, chunk_size: int) -> Iterable[bytes]:
            return (message[i : i + chunk_size] for i in range(0, len(message), chunk_size))

    client = object.__new__(web.DICOMwebClient)
    client._chunk_size = 13
    for stream in (False, True):
        assert list(client._decode_multipart_message(Response(), stream=stream)) == bodies

    # And the other direction: a STOW-RS body as dicomweb-client encodes it.
    content_type = f'multipart/related; type="{DICOM}"; boundary={B}'
    upload = web.DICOMwebClient._encode_multipart_message(bodies, content_type)
    assert bodies_of(parse(upload, tmp_path)) == bodies


def _read_only_file(folder: Path) -> tuple[int, Path]:
    """A part file that cannot be written: every write fails, as on a full disk."""
    path = folder / "part-read-only"
    path.write_bytes(b"")
    return os.open(path, os.O_RDONLY), path


def test_a_part_that_cannot_be_written_fails_and_is_removed(tmp_path: Path) -> None:
    message = encode_parts([(DICOM, os.urandom(700_000))], B)

    async def waiting() -> None:
        async for _ in iter_parts(_source([message]), B, spool_dir=tmp_path, max_part_size=1 << 20,
                                  max_parts=9, new_file=lambda: _read_only_file(tmp_path)):
            pass

    with pytest.raises(OSError):
        asyncio.run(waiting())
    assert list(tmp_path.iterdir()) == []

    async def handed_over() -> Part:
        parts = [part async for part in iter_parts(
            _source([message]), B, spool_dir=tmp_path, max_part_size=1 << 20, max_parts=9,
            wait=False, new_file=lambda: _read_only_file(tmp_path))]
        for future in (parts[0].written, parts[0].synced):
            with pytest.raises(OSError):
                await asyncio.wrap_future(future)
        return parts[0]

    asyncio.run(handed_over()).path.unlink()


def test_a_failed_fsync_is_told_apart_from_a_failed_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The part is written (its header may be read) but not durable: ``synced``
    raises, and a caller that waits for it gets the error, the file removed."""
    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    body = os.urandom(600_000)
    message = encode_parts([(DICOM, body)], B)

    async def handed_over() -> Part:
        [part] = [part async for part in iter_parts(
            _source([message]), B, spool_dir=tmp_path, max_part_size=1 << 20, max_parts=9,
            wait=False)]
        await asyncio.wrap_future(part.written)
        with pytest.raises(OSError, match="Input/output"):
            await asyncio.wrap_future(part.synced)
        return part

    part = asyncio.run(handed_over())
    assert part.path.read_bytes() == body
    part.path.unlink()
    with pytest.raises(OSError, match="Input/output"):
        parse(message, tmp_path)
    assert list(tmp_path.iterdir()) == []
