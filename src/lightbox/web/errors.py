"""Domain errors mapped to HTTP at the edge: a status and a reason, never a bare 500."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lightbox import errors

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


def _status_of(exc: errors.LightboxError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]  # type: ignore[index]
    return 400


async def domain_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.LightboxError)
    status = _status_of(exc)
    headers = {"WWW-Authenticate": 'Bearer realm="lightbox"'} if status == 401 else None
    # The Warning header carries the reason for clients that only look at headers.
    reason = exc.message.encode("ascii", "replace").decode()[:300].replace('"', "'")
    hdrs = dict(headers or {})
    hdrs["Warning"] = f'299 lightbox "{reason}"'
    return JSONResponse({"error": exc.message}, status_code=status, headers=hdrs)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code)


async def unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return JSONResponse({"error": "internal error"}, status_code=500)
