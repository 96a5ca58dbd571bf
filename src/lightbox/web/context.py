"""What every route needs from the app: the archive, the caller, the base URL."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response

from lightbox.archive import Archive
from lightbox.dicom import uids
from lightbox.dicom.dicomjson import BASE_PLACEHOLDER
from lightbox.errors import BadRequest, Forbidden, NotAcceptable, Unauthenticated
from lightbox.services.audit import Caller
from lightbox.services.auth import Authenticator, Principal
from lightbox.services.retrieve import InstanceCache
from lightbox.web.accept import parse_accept

T = TypeVar("T")
DICOM_JSON = "application/dicom+json"
SESSION_COOKIE = "lightbox_session"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def archive(request: Request) -> Archive:
    found: Archive = request.app.state.archive
    return found


def instance_cache(request: Request) -> InstanceCache:
    found: InstanceCache = request.app.state.instance_cache
    return found


def bearer_token(request: Request) -> str:
    """The token from ``Authorization: Bearer`` or from HTTP Basic's password."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer" and value.strip():
        return value.strip()
    if scheme == "basic" and value.strip():
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise Unauthenticated("malformed Basic credentials") from exc
        _user, sep, password = decoded.partition(":")
        if sep and password:
            return password
    raise Unauthenticated("authentication required: send Authorization: Bearer <token>")


def session_token(request: Request) -> str | None:
    return request.cookies.get(SESSION_COOKIE) or None


def origin(request: Request) -> str:
    """This server's origin as the browser sees it (scheme://host[:port])."""
    public: str = request.app.state.archive.settings.public_url
    if public:
        scheme, _, rest = public.partition("://")
        return f"{scheme}://{rest.split('/', 1)[0]}".lower()
    return f"{request.url.scheme}://{request.headers.get('host', '')}".lower()


def require_same_origin(request: Request) -> None:
    """CSRF protection for cookie-authenticated requests that change state.

    Browsers send ``Origin`` (or at least ``Sec-Fetch-Site``) on every POST,
    PUT and DELETE; a request from another site cannot forge them. The session
    cookie is also ``SameSite=Lax``.
    """
    sent = request.headers.get("origin")
    if sent is not None:
        if sent.lower() == origin(request):
            return
        raise Forbidden("cross-site request refused")
    site = request.headers.get("sec-fetch-site")
    if site in ("same-origin", "none"):
        return
    referer = request.headers.get("referer", "").lower()
    if site is None and referer.startswith(origin(request) + "/"):
        return
    raise Forbidden("cross-site request refused (no Origin header)")


def principal(request: Request) -> Principal:
    """The caller: a bearer token, Basic credentials, or the browser's session cookie."""
    cached = request.scope.get("lightbox.principal")
    if cached is not None:
        assert isinstance(cached, Principal)
        return cached
    auth: Authenticator = request.app.state.authenticator
    if "authorization" in request.headers:
        found = auth.authenticate(bearer_token(request))
    else:
        cookie = session_token(request)
        if cookie is None:
            raise Unauthenticated("authentication required: send Authorization: Bearer <token>")
        found = auth.authenticate(cookie)
        if request.method not in SAFE_METHODS:
            require_same_origin(request)
    request.scope["lightbox.principal"] = found
    return found


def path_uids(request: Request) -> tuple[str, str | None, str | None]:
    """The study, series and instance UIDs of a DICOMweb path, checked (series and
    instance None where the path names none)."""
    p = request.path_params
    study = uids.require_uid(p["study"], "StudyInstanceUID")
    series = uids.require_uid(p["series"], "SeriesInstanceUID") if "series" in p else None
    sop = uids.require_uid(p["instance"], "SOPInstanceUID") if "instance" in p else None
    return study, series, sop


def base_url(request: Request) -> str:
    """The DICOMweb root the caller used (e.g. http://host:8042/dicom-web).

    ``public_url`` wins when set (behind a reverse proxy). Some clients send a
    Host header without the port (dicomweb-client does); the port the server
    listens on is then added, unless it is the scheme's default.
    """
    root = str(request.scope.get("root_path", ""))
    public: str = request.app.state.archive.settings.public_url
    if public:
        return public.rstrip("/") + root
    netloc = request.url.netloc
    server = request.scope.get("server")
    if ":" not in netloc.rsplit("]", 1)[-1] and server and server[1] not in (80, 443, None):
        netloc = f"{netloc}:{server[1]}"
    return f"{request.url.scheme}://{netloc}{root}"


def resolve(request: Request, payload: bytes) -> bytes:
    """Replace the URI placeholder in cached DICOM JSON with the caller's root."""
    return payload.replace(BASE_PLACEHOLDER.encode(), base_url(request).encode())


_JSON_CHOICES = {DICOM_JSON, "application/json", "application/*", "*/*"}


def dicom_json(request: Request, payload: bytes, headers: dict[str, str] | None = None) -> Response:
    """A DICOM JSON answer, when the client accepts one (the ``accept`` query
    parameter standing for the header, PS3.18 8.3.3.1); 406 when it asked only
    for another form (XML, say), which Lightbox does not make."""
    accept = request.query_params.get("accept") or request.headers.get("accept")
    if not any(c.media_type.lower() in _JSON_CHOICES for c in parse_accept(accept)):
        raise NotAcceptable(f"this resource is available as {DICOM_JSON}")
    return Response(resolve(request, payload), media_type=DICOM_JSON, headers=headers)


async def form(request: Request) -> FormData:
    """The request's form, refused if a field holds a NUL character: no name,
    passcode or UID here has one, and PostgreSQL cannot store or compare one."""
    fields = await request.form()
    for key, value in fields.multi_items():
        if "\x00" in key or (isinstance(value, str) and "\x00" in value):
            raise BadRequest("a form field holds a NUL character")
    return fields


async def blocking(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run index or file work off the event loop."""
    return await run_in_threadpool(fn, *args, **kwargs)


def caller(request: Request) -> Caller:
    """The request's origin for the audit trail."""
    return Caller(
        source=request.client.host if request.client else None,
        user_agent=request.headers.get("user-agent"),
    )
