"""The viewer for a share link: OHIF on the link's scoped DICOMweb root.

- ``GET /s/<token>/view``: to the viewer showing the shared study.
- ``GET /s/<token>/view/…``: OHIF's page, whose configuration points at
  ``/s/<token>/dicom-web`` (the same grant as the link's page: this study,
  read-only, de-identified when the link says so) and offers no study list,
  uploads or local files.
- ``GET /s/<token>/app-config.js``: that configuration.

The viewer's files are the ones under ``/viewer/`` (public, cached). The
page itself needs what the link needs: an unlocked passcode (its cookie is
scoped to ``/s/<token>``, so the browser sends it with every DICOMweb call)
and, for organisation and collaborators links, the right signed-in user.
"""

from __future__ import annotations

from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from lightbox.services import sharing
from lightbox.web import context, viewer
from lightbox.web.pages import PAGE_HEADERS
from lightbox.web.share import open_link, share_errors
from lightbox.web.share_dicomweb import holder_of, unlock_token


def _scope(token: str) -> str:
    return f"/s/{quote(token, safe='')}"


@share_errors
async def open_viewer(request: Request) -> Response:
    link = await open_link(request)
    token = request.path_params["token"]
    study = link.public_uid(link.study_instance_uid)
    target = f"{_scope(token)}/view/viewer?StudyInstanceUIDs={quote(study)}"
    return RedirectResponse(target, status_code=303, headers={"Referrer-Policy": "no-referrer"})


@share_errors
async def viewer_page(request: Request) -> Response:
    link = await open_link(request)
    token = request.path_params["token"]
    archive = context.archive(request)
    if not await context.blocking(sharing.is_unlocked, archive, link, unlock_token(request)):
        return RedirectResponse(_scope(token), status_code=303)
    principal = await holder_of(request, link)
    build = viewer.build_of(request)
    if not build.available():
        return viewer.missing(build)
    page = await context.blocking(build.index)
    body = page.body
    assert body is not None  # the index is always rewritten, so kept in memory
    body = body.replace(b'src="/viewer/app-config.js"',
                        f'src="{_scope(token)}/app-config.js"'.encode())
    sharing.record(archive, "share_view", link, principal.user, caller=context.caller(request))
    headers = {**PAGE_HEADERS, **viewer.ISOLATION, "Referrer-Policy": "no-referrer"}
    return Response(body, media_type="text/html; charset=utf-8", headers=headers)


@share_errors
async def app_config(request: Request) -> Response:
    await open_link(request)
    scope = _scope(request.path_params["token"])
    return viewer.script(viewer.app_config(scope, f"{scope}/view", signed_in=False))


routes: list[BaseRoute] = [
    Route("/s/{token}/view", open_viewer, methods=["GET"]),
    Route("/s/{token}/view/{path:path}", viewer_page, methods=["GET"]),
    Route("/s/{token}/app-config.js", app_config, methods=["GET"]),
]
