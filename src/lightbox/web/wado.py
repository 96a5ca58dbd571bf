"""WADO-RS (PS3.18 §10.4): instances, metadata, frames, rendered (bulk data:
``bulkdata``)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from lightbox.dicom import render, uids
from lightbox.errors import BadRequest, NotAcceptable, NotFound, Unavailable
from lightbox.index.instances import StoredInstance
from lightbox.services import pixels, retrieve
from lightbox.web import bulkdata, context
from lightbox.web.accept import parse_accept
from lightbox.web.multipart import closing, new_boundary, part_header

MAX_FRAMES_PER_REQUEST = 10_000
CHUNK = 1024 * 1024

log = logging.getLogger(__name__)
Chosen = list[tuple[StoredInstance, str]]
Convert = Callable[[StoredInstance, str], bytes]


def syntax_choices(accept: str | None) -> list[str | None]:
    """Transfer syntaxes acceptable for application/dicom parts, best first; None
    means as stored.

    Per PS3.18 §8.7.3.5 an absent transfer-syntax parameter asks for Explicit
    VR Little Endian; ``*/*`` and ``transfer-syntax=*`` take what is stored.
    """
    choices: list[str | None] = []
    for choice in parse_accept(accept):
        if choice.media_type in ("*/*", "multipart/*") and choice.type is None:
            choices.append(None)
            continue
        dicom = choice.media_type == "application/dicom" or (
            choice.media_type == "multipart/related" and choice.type in (None, "application/dicom")
        )
        if dicom:
            ts = choice.transfer_syntax
            choices.append(None if ts == "*" else ts or uids.EXPLICIT_VR_LITTLE_ENDIAN)
    if not choices:
        raise NotAcceptable('instances are served as multipart/related; type="application/dicom"')
    return choices


def choose_syntax(instance: StoredInstance, choices: list[str | None]) -> str:
    """The first acceptable transfer syntax ``instance`` can be sent in: as stored,
    or Explicit VR Little Endian when a decoder for the stored form is installed."""
    stored = instance.transfer_syntax_uid
    for wanted in choices:
        if wanted is None or wanted == stored:
            return stored
        if wanted == uids.EXPLICIT_VR_LITTLE_ENDIAN and pixels.can_convert(instance):
            return wanted
    raise NotAcceptable(
        f"instance {instance.sop_instance_uid} is stored as {stored}; ask for it"
        f"{', for ' + uids.EXPLICIT_VR_LITTLE_ENDIAN if pixels.can_convert(instance) else ''}"
        " or for transfer-syntax=*"
    )


async def retrieve_instances(request: Request) -> Response:
    study, series, sop = context.path_uids(request)
    choices = syntax_choices(request.headers.get("accept"))
    archive = context.archive(request)
    principal = context.principal(request)
    found = await context.blocking(
        retrieve.download_instances, archive, principal, study, series, sop)
    # Decided for every instance before the first byte goes out: a 406 after
    # the 200 has started would only be a broken stream.
    chosen = [(instance, choose_syntax(instance, choices)) for instance in found]

    def convert(instance: StoredInstance, _syntax: str) -> bytes:
        return pixels.explicit_little_endian(archive, instance)

    chosen, first = await first_sendable(chosen, convert, keep_stored=True)
    boundary = new_boundary()
    ahead = retrieve.ReadAhead([instance for instance, _ in chosen])

    async def body() -> AsyncIterator[bytes]:
        end = b""  # of the part before, sent with the next one's header
        async for n, instance, syntax, data in sendable(chosen, first, convert, keep_stored=True):
            if keys := ahead.keys_for(n):
                await context.blocking(archive.blobs.prefetch, keys)
            yield end + part_header(boundary, f"application/dicom; transfer-syntax={syntax}")
            if data is None:
                async for chunk in _file_chunks(archive, instance):
                    yield chunk
            else:
                yield data
            end = b"\r\n"
        yield end + closing(boundary)

    media = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return StreamingResponse(body(), media_type=media)


async def first_sendable(
    chosen: Chosen, convert: Convert, *, keep_stored: bool
) -> tuple[Chosen, bytes | None]:
    """Before a multipart retrieve starts: ``chosen`` without the leading
    instances that cannot be converted (pixel data no decoder can read), and
    the first one's payload (see :func:`_payload`). When none can be, the
    first one's error: the caller gets it as an error status, not an empty 200.
    """
    failure: Unavailable | None = None
    for n, (instance, syntax) in enumerate(chosen):
        try:
            return chosen[n:], await _payload(instance, syntax, convert, keep_stored)
        except Unavailable as exc:
            _left_out(instance, exc)
            failure = failure or exc
    if failure is not None:
        raise failure
    return [], None


async def sendable(
    chosen: Chosen, first: bytes | None, convert: Convert, *, keep_stored: bool
) -> AsyncIterator[tuple[int, StoredInstance, str, bytes | None]]:
    """(position, instance, syntax, payload) for each instance that can be
    sent, after :func:`first_sendable`. One that cannot be converted, once the
    200 is out, is left out of the answer (logged) rather than cutting the
    stream, and with it the rest, short."""
    for n, (instance, syntax) in enumerate(chosen):
        try:
            data = first if n == 0 else await _payload(instance, syntax, convert, keep_stored)
        except Unavailable as exc:
            _left_out(instance, exc)
            continue
        yield n, instance, syntax, data


async def _payload(
    instance: StoredInstance, syntax: str, convert: Convert, keep_stored: bool
) -> bytes | None:
    """The instance's bytes in ``syntax``; None for its stored file as it is
    (with ``keep_stored``, when that is the syntax), which costs no thread trip."""
    if keep_stored and syntax == instance.transfer_syntax_uid:
        return None
    return await context.blocking(convert, instance, syntax)


def _left_out(instance: StoredInstance, exc: Unavailable) -> None:
    log.warning("retrieve: instance %s left out: %s", instance.sop_instance_uid, exc.message)


async def _file_chunks(archive: Any, instance: StoredInstance) -> AsyncIterator[bytes]:
    """A stored file, a chunk per trip to a worker thread: one trip in all
    for a file of up to one chunk (most instances), which is opened, read
    and closed there at once."""
    fh, chunk = await context.blocking(_first_chunk, archive, instance.blob_key)
    try:
        while chunk:
            yield chunk
            if fh is None:
                return
            chunk = await context.blocking(fh.read, CHUNK)
    finally:
        if fh is not None:
            fh.close()


def _first_chunk(archive: Any, key: str) -> tuple[BinaryIO | None, bytes]:
    """The blob's first chunk, and the blob still open if more may follow."""
    fh: BinaryIO = archive.blobs.open(key)
    try:
        chunk = fh.read(CHUNK)
    except BaseException:
        fh.close()
        raise
    if len(chunk) < CHUNK:  # a regular file reads short only at its end
        fh.close()
        return None, chunk
    return fh, chunk


async def metadata(request: Request) -> Response:
    study, series, sop = context.path_uids(request)
    archive = context.archive(request)
    principal = context.principal(request)
    payload = await context.blocking(retrieve.metadata, archive, principal, study, series, sop)
    return context.dicom_json(request, payload)


def _frame_numbers(text: str) -> list[int]:
    try:
        numbers = [int(n) for n in text.split(",") if n.strip()]
    except ValueError as exc:
        raise BadRequest(f"frame list {text[:64]!r} must be comma-separated numbers") from exc
    if not numbers or len(numbers) > MAX_FRAMES_PER_REQUEST or min(numbers) < 1:
        raise BadRequest("frame numbers start at 1; at most 10000 per request")
    return numbers


@dataclass(frozen=True)
class FrameForm:
    """How frames are answered: decoded to native or as stored, the part's
    media type, and whether as a single-part body (one frame, asked for as
    bare ``application/octet-stream`` or a bare compressed type)."""

    native: bool
    media: str
    single: bool = False

    def part_type(self, transfer_syntax: str) -> str:
        """The Content-Type of a part (or single-part body) holding a frame."""
        return f"{self.media}; transfer-syntax={transfer_syntax}"

    def message_type(self, boundary: str) -> str:
        """The Content-Type of a multipart answer of such parts."""
        return f'multipart/related; type="{self.media}"; boundary={boundary}'


def frame_syntax(accept: str | None, stored: str, count: int = 1) -> FrameForm:
    """The form of a frames answer on ``stored`` syntax for ``count`` frames.

    PS3.18 answers frames as multipart/related by default; a client that
    prefers a single-part payload (``Accept: application/octet-stream``) gets
    one when it asked for one frame. A single-part media type is permitted
    only for a resource that is a single response item (PS3.18 §10.4.4), so
    for a list of frames it is passed over, and 406 follows if nothing else
    was accepted.
    """
    compressed_type = uids.FRAME_MEDIA_TYPES.get(stored)
    for choice in parse_accept(accept):
        single = choice.media_type not in ("multipart/related", "*/*")
        if single and count > 1:
            continue
        media = choice.type if choice.media_type == "multipart/related" else choice.media_type
        if media in (None, "*/*", "application/octet-stream"):
            syntax = choice.transfer_syntax
            if syntax == "*" or (syntax == stored and compressed_type is not None):
                return FrameForm(False, "application/octet-stream", single)
            if syntax in (None, uids.EXPLICIT_VR_LITTLE_ENDIAN, stored):
                return FrameForm(True, "application/octet-stream", single)
            continue  # a syntax we neither keep nor make: not this choice (PS3.18 8.7.3.5)
        if compressed_type is not None and media == compressed_type:
            return FrameForm(False, compressed_type, single)
    raise NotAcceptable(f"frames of this instance are available as application/octet-stream"
                        f"{' or ' + compressed_type if compressed_type else ''}"
                        f"{' (several frames need multipart/related)' if count > 1 else ''}")


async def frames(request: Request) -> Response:
    study, series, sop = context.path_uids(request)
    assert series is not None and sop is not None
    numbers = _frame_numbers(request.path_params["frames"])
    archive = context.archive(request)
    cache = context.instance_cache(request)
    principal = context.principal(request)
    instance = await context.blocking(
        retrieve.find_instance, archive, cache, principal, study, series, sop
    )
    form = frame_syntax(
        request.headers.get("accept"), instance.transfer_syntax_uid, len(numbers)
    )
    boundary = new_boundary()
    content = form.message_type(boundary)
    if len(numbers) == 1:
        frame = await _frame(archive, instance, numbers[0], form)
        part_type = form.part_type(frame.transfer_syntax_uid)
        if form.single:
            return Response(frame.data, media_type=part_type)
        return Response(b"".join((part_header(boundary, part_type), frame.data, b"\r\n",
                                  closing(boundary))), media_type=content)
    # Checked before the first byte goes out: a 404 after the 200 has started
    # would only be a broken stream.
    missing = [n for n in numbers if n > instance.number_of_frames]
    if missing:
        raise NotFound(f"frame {missing[0]} not in instance "
                       f"(it has {instance.number_of_frames})")

    # The first frame too: pixel data that cannot be decoded is then an error
    # status (the frames of an instance share their codec), not a 200 cut short.
    first = await _frame(archive, instance, numbers[0], form)

    async def body() -> AsyncIterator[bytes]:
        # One frame at a time: a list of thousands of frames never sits in memory.
        for n, number in enumerate(numbers):
            frame = first if n == 0 else await _frame(archive, instance, number, form)
            part_type = form.part_type(frame.transfer_syntax_uid)
            yield b"".join((part_header(boundary, part_type), frame.data, b"\r\n"))
        yield closing(boundary)

    return StreamingResponse(body(), media_type=content)


async def _frame(archive: Any, instance: StoredInstance, number: int,
                 form: FrameForm) -> retrieve.Frame:
    # Ranged reads of a few hundred KiB from the page cache: cheaper inline
    # than a hop to a worker thread.
    frame = retrieve.stored_frame(archive, instance, number)
    if frame is None or (form.native and frame.transfer_syntax_uid not in uids.NATIVE_SYNTAXES):
        frame = await context.blocking(pixels.frame, archive, instance, number,
                                       native=form.native)
    return frame


async def rendered(request: Request) -> Response:
    thumbnail = request.url.path.endswith("/thumbnail")
    study, series, sop = context.path_uids(request)
    accept = request.headers.get("accept")
    params = dict(request.query_params)
    options = (render.thumbnail_options(params, accept) if thumbnail
               else render.parse_render_query(params, accept=accept))
    number = int(request.path_params.get("frame", 0)) if "frame" in request.path_params else None
    archive = context.archive(request)
    principal = context.principal(request)
    found = await context.blocking(retrieve.find_instances, archive, principal, study, series, sop)
    instance, number = _representative(found, number, single=sop is not None)
    data = await context.blocking(pixels.rendered, archive, instance, number, options)
    return Response(data, media_type=options.media_type)


def _representative(
    found: list[StoredInstance], number: int | None, *, single: bool
) -> tuple[StoredInstance, int]:
    """The instance and frame that stand for a study or series: the middle image."""
    if single:
        return found[0], number or 1
    images = [i for i in found if i.layout is not None] or found
    chosen = images[len(images) // 2]
    return chosen, number or pixels.representative_frame(chosen)


INSTANCE = "/studies/{study}/series/{series}/instances/{instance}"

routes = [
    Route("/studies/{study}", retrieve_instances, methods=["GET"]),
    Route("/studies/{study}/series/{series}", retrieve_instances, methods=["GET"]),
    Route(INSTANCE, retrieve_instances, methods=["GET"]),
    Route("/studies/{study}/metadata", metadata),
    Route("/studies/{study}/series/{series}/metadata", metadata),
    Route(INSTANCE + "/metadata", metadata),
    Route(INSTANCE + "/frames/{frames}", frames),
    Route(INSTANCE + "/bulkdata/{path:path}", bulkdata.bulkdata),
    Route("/studies/{study}/rendered", rendered),
    Route("/studies/{study}/thumbnail", rendered),
    Route("/studies/{study}/series/{series}/rendered", rendered),
    Route("/studies/{study}/series/{series}/thumbnail", rendered),
    Route(INSTANCE + "/rendered", rendered),
    Route(INSTANCE + "/thumbnail", rendered),
    Route(INSTANCE + "/frames/{frame:int}/rendered", rendered),
    Route(INSTANCE + "/frames/{frame:int}/thumbnail", rendered),
]
