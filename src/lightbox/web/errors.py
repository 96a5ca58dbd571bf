"""Domain errors mapped to HTTP at the edge: a status and a reason, never a bare 500."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lightbox import errors
from lightbox.web.observability import redact

log = logging.getLogger(__name__)

STATUS: dict[type[errors.LightboxError], int] = {
    errors.BadRequest: 400,
    errors.UnsupportedMediaType: 415,
    errors.InvalidInstance: 400,
    errors.Unauthenticated: 401,
    errors.Forbidden: 403,
    errors.NotFound: 404,
    errors.NotAcceptable: 406,
    errors.Conflict: 409,
    errors.TooLarge: 413,
    errors.Unavailable: 503,
}


def warning_value(text: str, limit: int = 300) -> str:
    """A ``Warning`` header value carrying ``text``: ``299 lightbox "<text>"``.

    Only printable ASCII is kept (others become ``?``): reasons may quote what a
    client sent, and a CR, LF or non-Latin-1 character would make the response
    unsendable. A double quote becomes ``'`` and a backslash ``?`` so that the
    quoted string needs no escapes.
    """
    safe = "".join(
        "'" if ch == '"' else ch if " " <= ch <= "~" and ch != "\\" else "?"
        for ch in text[:limit]
    )
    return f'299 lightbox "{safe}"'


def _status_of(exc: errors.LightboxError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 400


async def domain_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.LightboxError)
    status = _status_of(exc)
    if status == 503:  # the request was fine; what it needs is not there now
        log.warning("%s %s: %s", request.method, redact(request.url.path), exc.message)
    headers = {"WWW-Authenticate": 'Bearer realm="lightbox"'} if status == 401 else None
    # The Warning header carries the reason for clients that only look at headers.
    hdrs = dict(headers or {})
    hdrs["Warning"] = warning_value(exc.message)
    return JSONResponse({"error": exc.message}, status_code=status, headers=hdrs)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code)


async def unexpected_error(request: Request, exc: Exception) -> Response:
    # Redacted: a share link's or an invitation's path holds its token.
    log.exception("unexpected error on %s %s", request.method, redact(request.url.path))
    return JSONResponse({"error": "internal error"}, status_code=500)
