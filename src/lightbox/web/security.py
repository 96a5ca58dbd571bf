"""Security headers on every response, whether a request counts as HTTPS, and
paths that hold a NUL character refused before any route sees them.

``SecurityHeaders`` wraps the whole application (the frames fast path and the
server-error handler included), so no response leaves without
``X-Content-Type-Options: nosniff``. ``Strict-Transport-Security`` is added only
when the request arrived over TLS, or the archive's ``public_url`` is https
(a reverse proxy terminates TLS): browsers ignore it on plain HTTP, and
sending it there would pin a plain-HTTP deployment's name to HTTPS.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lightbox.web.errors import warning_value

# One year, no preload and no includeSubDomains: other hosts under the same
# name may not serve HTTPS, and preloading is the operator's decision.
HSTS = b"max-age=31536000"
_NOSNIFF = (b"x-content-type-options", b"nosniff")


def is_https(scheme: str, public_url: str) -> bool:
    """True when the browser talks to us over TLS, directly or through a proxy."""
    return scheme == "https" or public_url.lower().startswith("https://")


def https_request(request: Request) -> bool:
    """Whether cookies set in answer to ``request`` get the ``Secure`` flag."""
    public_url: str = request.app.state.archive.settings.public_url
    return is_https(request.url.scheme, public_url)


class SecurityHeaders:
    """ASGI middleware: ``nosniff`` on everything, HSTS on HTTPS (never both twice)."""

    def __init__(self, app: ASGIApp, *, public_url: str) -> None:
        self.app = app
        self.public_url = public_url

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        hsts = is_https(str(scope.get("scheme", "http")), self.public_url)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                if _NOSNIFF[0] not in present:
                    headers.append(_NOSNIFF)
                if hsts and b"strict-transport-security" not in present:
                    headers.append((b"strict-transport-security", HSTS))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class RefuseNul:
    """ASGI middleware: a path holding a NUL character (``%00``) is a 400, as a
    domain error would be. No UID, token or id in a path has one, and
    PostgreSQL cannot bind one, so without this every route taking a path
    parameter would need its own check. (Query parameters are read by their
    routes, which answer a bad value on their own terms: a page with its form.)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and "\x00" in scope["path"]:
            reason = "a NUL character in the path"
            response = JSONResponse({"error": reason}, status_code=400,
                                    headers={"Warning": warning_value(reason)})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
