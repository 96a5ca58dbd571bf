"""A lean path for the hottest request: one stored frame of a cached instance.

Viewers fetch frames one by one, thousands per study. This ASGI layer answers
``GET …/instances/{sop}/frames/{n}`` straight from the instance cache and a
ranged read, skipping routing and middleware. Whenever anything is not
simple (no cached instance, decoding needed, bad credentials, any error) it
hands the request to the full application, which gives the complete answer.
"""

from __future__ import annotations

import re
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from lightbox.errors import LightboxError
from lightbox.services import retrieve
from lightbox.services.auth import Authenticator
from lightbox.services.retrieve import InstanceCache
from lightbox.web.multipart import closing, new_boundary, part_header
from lightbox.web.wado import frame_syntax

_FRAME_URL = re.compile(
    r"/dicom-web/studies/([0-9.]{1,64})/series/([0-9.]{1,64})/instances/([0-9.]{1,64})"
    r"/frames/([0-9]{1,6})"
)


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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            match = _FRAME_URL.fullmatch(scope["path"])
            if match is not None:
                answer = self._answer(scope, match)
                if answer is not None:
                    media, body = answer
                    await send(
                        {
                            "type": "http.response.start",
                            "status": 200,
                            "headers": [
                                (b"content-type", media),
                                (b"content-length", str(len(body)).encode()),
                            ],
                        }
                    )
                    await send({"type": "http.response.body", "body": body})
                    self.metrics.requests.labels("GET", "frames", "200").inc()
                    return
        await self.app(scope, receive, send)

    def _answer(self, scope: Scope, match: re.Match[str]) -> tuple[bytes, bytes] | None:
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        try:
            principal = self.authenticator.authenticate(token.strip())
            study, series, sop, number = match.groups()
            if not principal.may_read(study):
                return None
            instance = self.cache.get((study, series, sop))
            if instance is None:
                return None
            accept = headers.get(b"accept", b"").decode("latin-1") or None
            native, media = frame_syntax(accept, instance.transfer_syntax_uid)
            frame = retrieve.stored_frame(self.archive, instance, int(number))
        except (LightboxError, OSError):
            return None
        if frame is None or (native and frame.transfer_syntax_uid != "1.2.840.10008.1.2.1"):
            return None
        boundary = new_boundary()
        body = b"".join(
            (
                part_header(boundary, f"{media}; transfer-syntax={frame.transfer_syntax_uid}"),
                frame.data,
                b"\r\n",
                closing(boundary),
            )
        )
        content = f'multipart/related; type="{media}"; boundary={boundary}'
        return content.encode(), body
