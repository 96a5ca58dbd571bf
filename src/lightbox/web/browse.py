"""The study browser pages: the study list, a study's page, series thumbnails,
hand-over to desktop viewers and deleting a study.

Routes parse the request, call one service and render a template; domain
errors on pages become an HTML page with the right status (404 for studies
the caller may not see, never 403).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import wraps
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from lightbox.errors import BadRequest, LightboxError
from lightbox.index.browse import SortKey
from lightbox.services import access, audit, browse, folders, sharing, thumbnails
from lightbox.web import context
from lightbox.web.errors import STATUS
from lightbox.web.pages import page_principal, render

Handler = Callable[[Request], Awaitable[Response]]
LIST_PARAMS = ("name", "id", "accession", "from", "to", "modality", "sort", "dir", "size")
MODALITIES = ("CT", "MR", "CR", "DX", "US", "MG", "NM", "PT", "XA", "RF", "OT", "SR", "SEG")


def _status(exc: LightboxError) -> int:
    return next((STATUS[c] for c in type(exc).__mro__ if c in STATUS), 400)


def html_errors(handler: Handler) -> Handler:
    """Answer domain errors of a page handler with an HTML page."""

    @wraps(handler)
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except LightboxError as exc:
            return render(request, "browse_error.html", _status(exc), message=exc.message)

    return wrapped


def person(value: str | None) -> str:
    """DOE^JANE^M → DOE, JANE M (the alphabetic group only)."""
    if not value:
        return ""
    parts = value.split("=")[0].split("^")
    family, given = parts[0], " ".join(p for p in parts[1:] if p)
    return f"{family}, {given}" if given else family


def day(value: str | None) -> str:
    if not value or len(value) != 8:
        return value or ""
    return f"{value[:4]}-{value[4:6]}-{value[6:]}"


def modalities(value: str | None) -> str:
    return ", ".join(m for m in (value or "").split("\\") if m)


class Links:
    """Query strings of the list page that keep the current filters."""

    def __init__(self, request: Request, base: str = "/browse") -> None:
        self._params = {k: v for k in LIST_PARAMS if (v := request.query_params.get(k, ""))}
        self._base = base

    def page(self, number: int) -> str:
        return f"{self._base}?" + urlencode({**self._params, "page": number})

    def sort(self, key: str, current: browse.Listing) -> str:
        flip = current.sort.value == key and not current.descending
        params = {**self._params, "sort": key, "dir": "desc" if flip else "asc"}
        if key == SortKey.STUDY_DATE.value and current.sort.value != key:
            params["dir"] = "desc"
        return f"{self._base}?" + urlencode(params)

    def patient(self, patient_id: str | None) -> str:
        return "/browse?" + urlencode({"id": patient_id or ""})


@html_errors
async def study_list(request: Request) -> Response:
    principal = page_principal(request)
    params = dict(request.query_params)
    error: str | None = None
    try:
        listing = browse.parse_listing(params)
    except BadRequest as exc:
        listing, error = browse.Listing(), exc.message
    archive = context.archive(request)
    found = None
    if error is None:
        found = await context.blocking(browse.list_studies, archive, principal, listing)
    return render(
        request, "browse.html", 400 if error else 200, error=error, listing=listing,
        found=found, params=params, links=Links(request), modality_choices=MODALITIES,
        person=person, day=day, modalities=modalities, deleted="deleted" in params,
    )


@html_errors
async def study_page(request: Request) -> Response:
    principal = page_principal(request)
    study_uid = request.path_params["study"]
    archive = context.archive(request)
    view = await context.blocking(
        browse.study_view, archive, principal, study_uid,
        series_uid=request.query_params.get("series"), sop_uid=request.query_params.get("sop"),
    )
    may_share = access.may_reshare(principal, study_uid)
    shares = await context.blocking(sharing.list_shares, archive, principal, study_uid)
    # Who looked at a study is for administrators and the owners of its folders.
    grants = access.grants_on(principal, study_uid)
    may_audit = grants is None or any(g.role == "owner" for g in grants)
    history = await context.blocking(
        audit.history_of_study, archive.db, study_uid, 50) if may_audit else []
    holding, targets = await context.blocking(
        folders.study_folders, archive, principal, study_uid)
    # A link for the collaborators of a folder is made from that folder's list.
    from_folder = next((f for f in holding if f.public_id == request.query_params.get("folder")),
                       None)
    return render(
        request, "study.html", view=view, principal=principal, person=person, day=day,
        modalities=modalities, may_write=not principal.read_only,
        may_delete=principal.is_admin and not principal.read_only,
        may_share=may_share, shares=shares, history=history, holding=holding,
        targets=targets if may_share else [], from_folder=from_folder,
        may_download=access.may_download(principal, study_uid),
    )


async def thumbnail(request: Request) -> Response:
    principal = context.principal(request)
    study_uid, series_uid = request.path_params["study"], request.path_params["series"]
    found = await context.blocking(
        thumbnails.series_thumbnail, context.archive(request), principal, study_uid, series_uid
    )
    # Revalidated on every view: the URL stays the same when the series changes.
    headers = {"ETag": found.etag, "Cache-Control": "private, no-cache",
               "X-Content-Type-Options": "nosniff"}
    if request.headers.get("if-none-match") == found.etag:
        return Response(status_code=304, headers=headers)
    return Response(found.data, media_type=found.media_type, headers=headers)


@html_errors
async def launch(request: Request) -> Response:
    principal = page_principal(request)
    root = context.base_url(request) + "/dicom-web"
    url = await context.blocking(
        browse.launch_url, context.archive(request), principal,
        request.path_params["study"], request.path_params["launcher"], root,
    )
    return RedirectResponse(url, status_code=303)


@html_errors
async def delete_study(request: Request) -> Response:
    principal = page_principal(request)
    form = await context.form(request)
    if form.get("confirm") != "yes":
        raise BadRequest("tick the box to confirm that the study is to be deleted")
    await context.blocking(
        browse.delete_study, context.archive(request), context.instance_cache(request),
        principal, request.path_params["study"], context.caller(request),
    )
    return RedirectResponse("/browse?deleted=1", status_code=303)


routes: list[BaseRoute] = [
    Route("/browse", study_list),
    Route("/browse/studies/{study}", study_page),
    Route("/browse/studies/{study}/delete", delete_study, methods=["POST"]),
    Route("/browse/thumbnails/{study}/{series}.jpg", thumbnail),
    Route("/launch/{launcher}/{study}", launch, methods=["POST"]),
]
