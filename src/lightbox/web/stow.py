"""STOW-RS (PS3.18 §10.5): store instances sent as multipart/related.

The body is parsed as it streams in; each part lands, fsynced, in the blob
store's staging folder and goes through the one ingest path
once the whole body has arrived.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from lightbox.archive import Archive
from lightbox.dicom import uids
from lightbox.errors import BadRequest, TooLarge, UnsupportedMediaType
from lightbox.services import folders, readahead
from lightbox.services.auth import Principal
from lightbox.services.ingest import (
    FailureReason,
    Offer,
    Outcome,
    Status,
    commit,
    discard,
    prepare,
)
from lightbox.web import context
from lightbox.web.errors import warning_value
from lightbox.web.multipart import parse_content_type
from lightbox.web.multipart_reader import Part, iter_parts

DICOM_TYPES = ("application/dicom",)


async def _limited(request: Request, limit: int) -> AsyncIterator[bytes]:
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise TooLarge(f"upload exceeds {limit} bytes")
        yield chunk


def _boundary(request: Request) -> str:
    media, params = parse_content_type(request.headers.get("content-type", ""))
    if media != "multipart/related":
        raise UnsupportedMediaType(
            f'STOW-RS takes multipart/related; type="application/dicom", not {media or "nothing"!r}'
        )
    if params.get("type", "application/dicom").lower() not in DICOM_TYPES:
        raise UnsupportedMediaType(f"part type {params.get('type')!r} is not supported")
    if "boundary" not in params:
        raise BadRequest("multipart/related needs a boundary parameter")
    return params["boundary"]


async def store(request: Request) -> Response:
    study = request.path_params.get("study")
    if study is not None:
        uids.require_uid(study, "StudyInstanceUID")
    archive = context.archive(request)
    principal = context.principal(request)
    principal.require_write()
    boundary = _boundary(request)
    settings = archive.settings
    received: list[_Received] = []
    parts = iter_parts(
        _limited(request, settings.max_upload_bytes), boundary,
        spool_dir=archive.blobs.staging_dir(), max_part_size=settings.max_instance_bytes,
        max_parts=settings.max_parts, wait=False, new_file=archive.blobs.new_staging_file,
    )
    # Every part is kept on disk (never in memory) until the whole body has
    # arrived; only then is anything stored, so a request that breaks off
    # half-way changes nothing. Meanwhile each received part is fsynced on its
    # writer thread and its header read in the helper process, while the next part
    # arrives: when the body ends, little is left to do but index.
    try:
        async for part in parts:
            received.append(_Received.start(part, len(received)))
        offers = [await item.finish() for item in received]
    except BaseException:
        for item in received:
            item.offer.path.unlink(missing_ok=True)
        raise
    outcomes = await context.blocking(_ingest, archive, principal, offers, study)
    _audit(request, principal.user, outcomes)
    if not outcomes:
        raise BadRequest("the request holds no DICOM instances")
    return _response(request, outcomes, study)


def _ingest(archive: Archive, principal: Principal, offers: list[Offer],
            study: str | None) -> list[Outcome]:
    """Store the offers (on a thread: one hop off the event loop for all of it)."""
    prepared = prepare(archive, offers, study)
    try:
        prepared = folders.screen_uploads(archive, principal, prepared)
        outcomes = commit(archive, prepared)
    except Exception:
        # The ingest path consumes staged files; if it failed unexpectedly, what
        # is left must not wait in staging for the next start-up sweep.
        discard(prepared)
        raise
    stored = {o.study_instance_uid for o in outcomes if o.status is not Status.REJECTED}
    offered = {o.study_instance_uid for o in outcomes if o.study_instance_uid}
    folders.file_uploads(archive, principal, {s for s in stored if s is not None},
                         offered=offered)
    return outcomes


@dataclass
class _Received:
    """A part on disk (or still being written and fsynced), with its header
    read (in the helper process) to follow the last write."""

    offer: Offer
    written: asyncio.Future[None]
    synced: asyncio.Future[None]
    header: Future[readahead.Header | None]

    @classmethod
    def start(cls, part: Part, number: int) -> _Received:
        source = f"part {number + 1}"
        if part.content_type not in ("", *DICOM_TYPES):
            # Still offered: the ingest path rejects what is not DICOM, with a reason.
            source += f" ({part.content_type})"
        written = asyncio.wrap_future(part.written)
        synced = asyncio.wrap_future(part.synced)
        for future in (written, synced):
            # Retrieved here too, so a request that breaks off leaves no unread error.
            future.add_done_callback(lambda done: done.cancelled() or done.exception())
        offer = Offer(part.path, source, staged=True, synced=False)
        return cls(offer, written, synced, _header_when_written(part))

    async def finish(self) -> Offer:
        """The offer, marked synced if its fsync succeeded (ingest retries
        and reports one that did not), with its header read ahead or on its
        way (ingest reads it itself if it has not come when it is needed).
        A part that could not be written fails the request."""
        await self.written
        try:
            await self.synced
            synced = True
        except OSError:
            synced = False
        return replace(self.offer, synced=synced, header=self.header)


def _header_when_written(part: Part) -> Future[readahead.Header | None]:
    """The part's header from the helper, asked for once the part is written
    (None: ingest reads it)."""
    header: Future[readahead.Header | None] = Future()

    def ask(written: Future[None]) -> None:
        failed = written.cancelled() or written.exception() is not None
        asked = None if failed else readahead.helper.submit(part.path)
        if asked is None:
            header.set_result(None)
        else:
            asked.add_done_callback(lambda answer: header.set_result(answer.result()))

    part.written.add_done_callback(ask)
    return header


def _audit(request: Request, actor: str, outcomes: list[Outcome]) -> None:
    """Count what was stored, per study, in the audit trail."""
    stored = Counter(o.study_instance_uid for o in outcomes if o.status is Status.STORED)
    caller = context.caller(request)
    for study, n in stored.items():
        context.archive(request).audit.count(
            "upload", actor, study, source=caller.source, user_agent=caller.user_agent, n=n
        )


def _response(request: Request, outcomes: list[Outcome], study: str | None) -> Response:
    base = context.base_url(request)
    referenced: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for o in outcomes:
        item: dict[str, Any] = {}
        if o.sop_class_uid:
            item["00081150"] = {"vr": "UI", "Value": [o.sop_class_uid]}
        if o.sop_instance_uid:
            item["00081155"] = {"vr": "UI", "Value": [o.sop_instance_uid]}
        if o.status is Status.REJECTED:
            code = int(o.failure or FailureReason.PROCESSING_FAILURE)
            item["00081197"] = {"vr": "US", "Value": [code]}
            failed.append(item)
        else:
            item["00081190"] = {"vr": "UR", "Value": [
                f"{base}/studies/{o.study_instance_uid}/series/{o.series_instance_uid}"
                f"/instances/{o.sop_instance_uid}"]}
            referenced.append(item)
    body: dict[str, Any] = {}
    if study:
        body["00081190"] = {"vr": "UR", "Value": [f"{base}/studies/{study}"]}
    if referenced:
        body["00081199"] = {"vr": "SQ", "Value": referenced}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    status = 200 if not failed else (202 if referenced else 409)
    headers = _warnings(outcomes)
    payload = json.dumps(body, separators=(",", ":")).encode()
    return Response(payload, status_code=status, media_type=context.DICOM_JSON, headers=headers)


def _warnings(outcomes: list[Outcome]) -> dict[str, str] | None:
    notes = []
    for o in outcomes:
        if o.status is Status.REJECTED:
            notes.append(f"{o.source}: {o.reason}")
        elif o.status is Status.DUPLICATE:
            notes.append(f"{o.source}: {o.sop_instance_uid} was already stored (kept)")
    if not notes:
        return None
    return {"Warning": warning_value("; ".join(notes[:20]), limit=2000)}


routes = [
    Route("/studies", store, methods=["POST"]),
    Route("/studies/{study}", store, methods=["POST"]),
]
