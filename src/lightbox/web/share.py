"""Share link pages: what a patient or physician opens, and how owners make
and revoke links.

- ``GET /s/<token>``: the study's summary, series thumbnails, download and a
  QR code of the link; a passcode form first when the link has one.
- ``POST /s/<token>``: the passcode form (same-origin only); on success an
  HttpOnly cookie scoped to ``/s/<token>`` carries an unlock token.
- ``POST /s/<token>/unlock``: the same for programs (JSON with the token).
- ``GET /s/<token>/download.zip``: the study as a ZIP, if the link allows.
- ``/s/<token>/dicom-web``: the link's DICOMweb root (``share_dicomweb``).
- ``POST /shares``, ``POST /shares/<id>/revoke``, ``GET /shares/<id>``: make,
  revoke and look at a link (its creator or an administrator).

Unknown, expired and revoked links all get the same 404 page. The token is
in the URL, so share pages ask browsers never to send it on as a referrer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import wraps
from urllib.parse import quote

import segno
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route

from lightbox.errors import Forbidden, LightboxError, NotFound, Unauthenticated
from lightbox.services import audit, export, shared_study, sharing
from lightbox.services.auth import parse_duration
from lightbox.services.sharing import ShareLink
from lightbox.web import context, pages
from lightbox.web.browse import day, person
from lightbox.web.errors import STATUS
from lightbox.web.security import https_request
from lightbox.web.share_dicomweb import SHARE_COOKIE, ScopedRoot, holder_of, unlock_token

Handler = Callable[[Request], Awaitable[Response]]
GONE = "This link is not valid. It may have expired or been revoked."


def _no_referrer(response: Response) -> Response:
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def _render(request: Request, template: str, status_code: int = 200, **values: object) -> Response:
    return _no_referrer(pages.render(request, template, status_code, **values))


def share_errors(handler: Handler) -> Handler:
    """Domain errors of share pages as an HTML page; every NotFound looks the same."""

    @wraps(handler)
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except NotFound:
            return _render(request, "share_error.html", 404, title="Link not valid", message=GONE)
        except LightboxError as exc:
            status = next((STATUS[c] for c in type(exc).__mro__ if c in STATUS), 400)
            return _render(request, "share_error.html", status, title="Not available",
                           message=exc.message)

    return wrapped


def link_url(request: Request, token: str) -> str:
    return f"{context.base_url(request)}/s/{token}"


def qr_svg(url: str) -> str:
    """The link as a QR code, inline SVG (medium error correction)."""
    code = segno.make(url, error="m", micro=False)
    return str(code.svg_inline(scale=4, border=2, dark="#111", light="#fff"))


async def open_link(request: Request) -> ShareLink:
    token = request.path_params["token"]
    link = await context.blocking(sharing.resolve, context.archive(request), token)
    if link.access.needs_sign_in:
        pages.page_principal(request)  # to the login page and back
    return link


@share_errors
async def share_page(request: Request) -> Response:
    link = await open_link(request)
    archive = context.archive(request)
    token = request.path_params["token"]
    if not await context.blocking(sharing.is_unlocked, archive, link, unlock_token(request)):
        return _render(request, "share_passcode.html", error=None, token=token)
    principal = await holder_of(request, link)
    summary = await context.blocking(shared_study.summary, archive, link)
    sharing.record(archive, "share_open", link, principal.user, caller=context.caller(request))
    url = link_url(request, token)
    return _render(
        request, "share.html", link=link, summary=summary, token=token, url=url,
        qr=qr_svg(url), root=f"/s/{quote(token)}/dicom-web", day=day, person=person,
    )


def same_origin(request: Request) -> None:
    """CSRF check for forms posted from share pages.

    Those pages say ``Referrer-Policy: no-referrer``, and browsers then send
    ``Origin: null`` with their forms; ``Sec-Fetch-Site`` (which no page can
    set) still tells a same-origin post apart.
    """
    if request.headers.get("origin") == "null":
        if request.headers.get("sec-fetch-site") == "same-origin":
            return
        raise Forbidden("cross-site request refused")
    context.require_same_origin(request)


@share_errors
async def passcode_form(request: Request) -> Response:
    same_origin(request)
    link = await open_link(request)
    token = request.path_params["token"]
    form = await context.form(request)
    try:
        unlock, expires_at = await _unlock(request, link, str(form.get("passcode", "")))
    except (Unauthenticated, Forbidden) as exc:
        status = 401 if isinstance(exc, Unauthenticated) else 403
        return _render(request, "share_passcode.html", status, error=exc.message, token=token)
    response = RedirectResponse(f"/s/{quote(token)}", status_code=303)
    response.set_cookie(
        SHARE_COOKIE, unlock, path=f"/s/{token}", httponly=True, samesite="lax",
        secure=https_request(request),
        max_age=max(1, int((expires_at - datetime.now(UTC)).total_seconds())),
    )
    return _no_referrer(response)


async def _unlock(request: Request, link: ShareLink, passcode: str) -> tuple[str, datetime]:
    """Try the passcode, with the attempt (either way) in the audit trail."""
    archive = context.archive(request)
    caller = context.caller(request)
    try:
        unlocked = await context.blocking(sharing.unlock, archive, link, passcode)
    except (Unauthenticated, Forbidden) as exc:
        sharing.record(archive, "share_unlock", link, f"link:{link.id}", outcome="failure",
                       caller=caller, detail={"reason": exc.message})
        raise
    sharing.record(archive, "share_unlock", link, f"link:{link.id}", caller=caller)
    return unlocked


async def unlock_api(request: Request) -> Response:
    """``POST /s/<token>/unlock`` with ``passcode``: ``{"token", "expires"}`` for
    ``Authorization: Bearer`` on the link's DICOMweb root."""
    link = await context.blocking(
        sharing.resolve, context.archive(request), request.path_params["token"])
    form = await context.form(request)
    unlock, expires_at = await _unlock(request, link, str(form.get("passcode", "")))
    return JSONResponse({"token": unlock, "expires": expires_at.isoformat()},
                        headers={"Cache-Control": "no-store"})


@share_errors
async def download(request: Request) -> Response:
    link = await open_link(request)
    archive = context.archive(request)
    principal = await holder_of(request, link)
    if not link.allow_download:
        raise Forbidden("this link does not allow downloads")
    if link.deidentify:
        found = await context.blocking(
            shared_study.deidentified_export, archive, link, principal)
    else:
        found = await context.blocking(
            export.open_study_export, archive, principal, link.study_instance_uid)
    sharing.record(archive, "share_download", link, principal.user,
                   caller=context.caller(request))
    headers = {"Content-Disposition": f'attachment; filename="{found.filename}"',
               "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer"}
    return StreamingResponse(export.zip_chunks(archive, found), media_type="application/zip",
                             headers=headers)


# -- owners: make, look at, revoke --------------------------------------------------------


def _checked(form_value: object) -> bool:
    return str(form_value or "").lower() in ("on", "1", "true", "yes")


@share_errors
async def create(request: Request) -> Response:
    principal = pages.page_principal(request)
    context.require_same_origin(request)
    form = await context.form(request)
    passcode = str(form.get("passcode", "")) or None
    made = await context.blocking(
        sharing.create_share, context.archive(request), principal,
        study=str(form.get("study", "")).strip(),
        expires=parse_duration(str(form.get("expires", "") or "30d")),
        passcode=passcode, allow_download=_checked(form.get("download")),
        deidentify=_checked(form.get("deidentify")),
        access=sharing.parse_access(str(form.get("access", "") or "anyone")),
        folder=str(form.get("folder", "") or "") or None,
    )
    link = made.link
    sharing.record(context.archive(request), "share_create", link, principal.user,
                   caller=context.caller(request), detail=_detail(link))
    url = link_url(request, made.token)
    # Owner pages keep the usual referrer policy: their URLs hold no token,
    # and their forms must carry an Origin for the same-origin check.
    return pages.render(request, "share_created.html", 201, link=link, url=url, qr=qr_svg(url))


def _detail(link: ShareLink) -> dict[str, object]:
    return {"expires": link.expires_at.isoformat(), "passcode": link.has_passcode,
            "download": link.allow_download, "deidentify": link.deidentify,
            "access": link.access.value}


@share_errors
async def manage(request: Request) -> Response:
    principal = pages.page_principal(request)
    archive = context.archive(request)
    link = await context.blocking(sharing.get_share, archive, principal, request.path_params["id"])
    history = await context.blocking(audit.history_of_link, archive.db, link.id)
    return pages.render(request, "share_manage.html", link=link, history=history)


@share_errors
async def revoke(request: Request) -> Response:
    principal = pages.page_principal(request)
    context.require_same_origin(request)
    archive = context.archive(request)
    link = await context.blocking(sharing.revoke, archive, principal, request.path_params["id"])
    sharing.record(archive, "share_revoke", link, principal.user, caller=context.caller(request))
    return RedirectResponse(f"/shares/{quote(link.id)}", status_code=303)


routes: list[BaseRoute] = [
    Route("/s/{token}", share_page, methods=["GET"]),
    Route("/s/{token}", passcode_form, methods=["POST"]),
    Route("/s/{token}/unlock", unlock_api, methods=["POST"]),
    Route("/s/{token}/download.zip", download, methods=["GET"]),
    Mount("/s/{token}/dicom-web", app=ScopedRoot()),
    Route("/shares", create, methods=["POST"]),
    Route("/shares/{id}", manage, methods=["GET"]),
    Route("/shares/{id}/revoke", revoke, methods=["POST"]),
]
