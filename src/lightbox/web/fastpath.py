"""A lean path for the hottest request: one stored frame of a cached instance.

Viewers fetch frames one by one, thousands per study. This ASGI layer answers
``GET …/instances/{sop}/frames/{n}`` straight from the instance cache and a
ranged read, skipping routing and middleware. Whenever anything is not
simple (no cached instance, decoding needed, bad credentials, any error) it
hands the request to the full application, which gives the complete answer.
"""

from __future__ import annotations

import os
import re
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from lightbox.dicom.uids import EXPLICIT_VR_LITTLE_ENDIAN
from lightbox.errors import LightboxError
from lightbox.services.auth import Authenticator
from lightbox.services.retrieve import InstanceCache
from lightbox.web.audit import client_of
from lightbox.web.context import SESSION_COOKIE
from lightbox.web.multipart import closing, new_boundary, part_header
from lightbox.web.wado import FrameForm, frame_syntax

_FRAME_URL = re.compile(
    r"/dicom-web/studies/([0-9.]{1,64})/series/([0-9.]{1,64})/instances/([0-9.]{1,64})"
    r"/frames/([0-9]{1,6})"
)


_COOKIE = re.compile(rb"(?:^|;)\s*" + SESSION_COOKIE.encode() + rb"=([^;\s]+)")


def _credential(headers: dict[bytes, bytes]) -> str | None:
    """A bearer token or the session cookie; anything else goes the full way."""
    auth = headers.get(b"authorization")
    if auth is not None:
        scheme, _, token = auth.decode("latin-1").partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    found = _COOKIE.search(headers.get(b"cookie", b""))
    return found.group(1).decode("latin-1") if found else None


class FramesFastPath:
    def __init__(
        self,
        app: ASGIApp,
        *,
        archive: Any,
        authenticator: Authenticator,
        cache: InstanceCache,
        metrics: Any,
    ) -> None:
        self.app = app
        self.archive = archive
        self.authenticator = authenticator
        self.cache = cache
        self.metrics = metrics
        self._negotiated: dict[tuple[str | None, str], FrameForm] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            match = _FRAME_URL.fullmatch(scope["path"])
            if match is not None:
                answer = self._answer(scope, match)
                if answer is not None:
                    media, pieces = answer
                    await send(
                        {
                            "type": "http.response.start",
                            "status": 200,
                            "headers": [
                                (b"content-type", media),
                                (b"content-length", str(sum(map(len, pieces))).encode()),
                            ],
                        }
                    )
                    last = len(pieces) - 1
                    for i, piece in enumerate(pieces):
                        await send({"type": "http.response.body", "body": piece,
                                    "more_body": i < last})
                    self.metrics.requests.labels("GET", "frames", "200").inc()
                    return
        await self.app(scope, receive, send)

    def _negotiate(self, accept: str | None, syntax: str) -> FrameForm:
        """frame_syntax(), remembered: viewers send the same Accept every time."""
        key = (accept, syntax)
        found = self._negotiated.get(key)
        if found is None:
            found = frame_syntax(accept, syntax)
            if len(self._negotiated) > 256:
                self._negotiated.clear()
            self._negotiated[key] = found
        return found

    def _answer(self, scope: Scope, match: re.Match[str]) -> tuple[bytes, list[bytes]] | None:
        headers = dict(scope["headers"])
        token = _credential(headers)
        if token is None:
            return None
        try:
            principal = self.authenticator.authenticate(token)
            study, series, sop, number = match.groups()
            if not principal.may_read(study):
                return None
            instance = self.cache.get((study, series, sop))
            if instance is None or instance.layout is None or instance.layout.encapsulated:
                return None
            accept = headers.get(b"accept", b"").decode("latin-1") or None
            form = self._negotiate(accept, instance.transfer_syntax_uid)
            frames = instance.layout.frames
            if not 1 <= int(number) <= len(frames):
                return None
            answer = self._native_frame(instance.blob_key, frames[int(number) - 1][0], form)
            if answer is not None:
                source, agent = client_of(scope)
                self.archive.audit.count(
                    "frames", principal.user, study, source=source, user_agent=agent
                )
            return answer
        except (LightboxError, OSError, ValueError):
            return None

    def _native_frame(
        self, blob_key: str, extent: tuple[int, int], form: FrameForm
    ) -> tuple[bytes, list[bytes]] | None:
        """The body with one native frame (single part, or a multipart message
        of one part), in pieces sent one after the other: the frame is read
        straight into a bytes object (one copy from the page cache, no zero
        fill) and never joined to the part's header and delimiter."""
        offset, length = extent
        part_type = form.part_type(EXPLICIT_VR_LITTLE_ENDIAN)
        fd = os.open(self.archive.blobs.file_name(blob_key), os.O_RDONLY)
        try:
            frame = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        if len(frame) != length:
            return None  # the file changed under us: let the full path explain
        if form.single:
            return part_type.encode(), [frame]
        boundary = new_boundary()
        content = form.message_type(boundary)
        return content.encode(), [part_header(boundary, part_type), frame,
                                  b"\r\n" + closing(boundary)]
