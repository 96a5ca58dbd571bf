"""WADO-RS bulk data (PS3.18 §10.4.1.1.5): a value by its tag path, whole or
by a byte range, as multipart or bare; a video's stream or a single
compressed frame bare when asked for by its media type, so that a browser's
``<video src>`` can play it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from lightbox.dicom import uids
from lightbox.dicom.frames import cut
from lightbox.errors import BadRequest
from lightbox.index.instances import StoredInstance
from lightbox.services import pixels, retrieve
from lightbox.web import context
from lightbox.web.accept import parse_accept
from lightbox.web.multipart import closing, new_boundary, part_header

CHUNK = 1024 * 1024  # a larger value is read and sent a chunk at a time


class _Unsatisfiable(Exception):
    """The Range header names no byte of the value (HTTP 416)."""


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    if not header:
        return None
    unit, _, spec = header.partition("=")
    start_s, dash, end_s = spec.strip().partition("-")
    if unit.strip() != "bytes" or not dash or "," in spec:
        raise BadRequest("only a single bytes=START-END range is supported")
    try:
        if start_s:
            start = int(start_s)
            end = min(int(end_s), size - 1) if end_s else size - 1
        else:
            start, end = max(size - int(end_s), 0), size - 1
    except ValueError as exc:
        raise BadRequest(f"bad Range header {header[:64]!r}") from exc
    if start < 0 or start > end or start >= size:
        raise _Unsatisfiable
    return start, end


async def bulkdata(request: Request) -> Response:
    study, series, sop = context.path_uids(request)
    assert series is not None and sop is not None
    tag_path = request.path_params["path"]
    archive = context.archive(request)
    principal = context.principal(request)
    instance = (await context.blocking(
        retrieve.find_instances, archive, principal, study, series, sop))[0]
    # The accept query parameter stands for the Accept header (PS3.18 8.3.3.1):
    # it is how a browser's <video src> asks for a stream.
    accept = request.query_params.get("accept") or request.headers.get("accept", "")
    stream_type = _stream_type(instance, tag_path, accept)
    value = _stored_value(instance, tag_path, stream=stream_type is not None)
    if value is None:  # a value inside the dataset that ingest did not map: parse for it
        data = await context.blocking(pixels.bulk_value, archive, instance, tag_path)
        value = BulkValue(len(data), data=data)
    try:
        rng = _byte_range(request.headers.get("range"), value.size)
    except _Unsatisfiable:
        # RFC 9110 §15.5.17: 416 with the value's length, not 404 (the resource exists).
        return JSONResponse(
            {"error": "requested range is outside the bulk data"}, status_code=416,
            headers={"Content-Range": f"bytes */{value.size}", "Accept-Ranges": "bytes"},
        )
    headers = {"Accept-Ranges": "bytes"}
    status = 200
    start, end = rng if rng is not None else (0, value.size - 1)
    if rng is not None:
        headers["Content-Range"] = f"bytes {start}-{end}/{value.size}"
        status = 206
    length = end - start + 1
    if stream_type is not None or accept.strip().startswith("application/octet-stream"):
        media = stream_type or "application/octet-stream"
        head, tail = b"", b""
    else:
        # PS3.18 returns bulk data as multipart/related by default.
        boundary = new_boundary()
        media = f'multipart/related; type="application/octet-stream"; boundary={boundary}'
        head = part_header(boundary, "application/octet-stream")
        tail = b"\r\n" + closing(boundary)
    if value.data is not None or length <= CHUNK:
        data = (value.data[start : end + 1] if value.data is not None
                else await context.blocking(retrieve.read_ranges, archive, instance,
                                            value.slice(start, length)))
        return Response(head + data + tail, status_code=status, media_type=media,
                        headers=headers)
    # Large values go out a chunk at a time: memory stays bounded whatever their size.
    headers["Content-Length"] = str(len(head) + length + len(tail))
    pieces = value.slice(start, length)

    async def body() -> AsyncIterator[bytes]:
        yield head
        for offset, size in _chunked(pieces):
            yield await context.blocking(archive.blobs.read_range, instance.blob_key,
                                         offset, size)
        yield tail

    return StreamingResponse(body(), status_code=status, media_type=media, headers=headers)


@dataclass(frozen=True)
class BulkValue:
    """A bulk data value of ``size`` bytes: its ``data`` when it was read whole,
    else the (offset, length) ``segments`` of the stored file it is made of."""

    size: int
    data: bytes | None = None
    segments: tuple[tuple[int, int], ...] = ()

    def slice(self, start: int, length: int) -> list[tuple[int, int]]:
        """The segments of the file that hold bytes ``start``…``start+length-1``."""
        return cut(self.segments, start, length)


def _stored_value(instance: StoredInstance, tag_path: str, *, stream: bool) -> BulkValue | None:
    """Where the Pixel Data value (or, for ``stream``, the video stream or
    compressed frame inside it) lies in the stored file, from the layout ingest
    recorded; None for other values."""
    layout = instance.layout
    if tag_path.strip("/").upper() != "7FE00010" or layout is None:
        return None
    if stream:
        segments = tuple(layout.frames[0])  # one stream, its fragments in order
    elif layout.encapsulated:
        offset, total = layout.value  # items and the sequence delimiter, which is not value
        segments = ((offset, total - 8),)
    else:
        segments = (layout.value,)
    return BulkValue(sum(size for _, size in segments), segments=segments)


def _chunked(segments: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    for offset, size in segments:
        for at in range(0, size, CHUNK):
            yield offset + at, min(CHUNK, size - at)


def _stream_type(instance: StoredInstance, tag_path: str, accept: str) -> str | None:
    """The media type to answer compressed Pixel Data in, bare (no multipart, no
    DICOM items), when that is what the client asked for: a video as its stream,
    a single compressed frame as its image (PS3.18 8.7.3.3, 8.7.4)."""
    layout = instance.layout
    if tag_path.strip("/").upper() != "7FE00010" or layout is None or not layout.encapsulated:
        return None
    stored = instance.transfer_syntax_uid
    media = uids.VIDEO_MEDIA_TYPES.get(stored)
    if media is None and len(layout.frames) == 1:
        media = uids.FRAME_MEDIA_TYPES.get(stored)
    wanted = {choice.media_type.lower() for choice in parse_accept(accept)}
    return media if media is not None and media.lower() in wanted else None
