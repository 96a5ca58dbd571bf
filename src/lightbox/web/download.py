"""Study download: ``GET /download/studies/{uid}.zip``, a ZIP with a DICOMDIR.

Bearer/Basic clients get 401 without credentials; a browser without a session
is sent to the login page and back. Unknown studies and studies the caller may
not see are both 404.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from lightbox.dicom import uids
from lightbox.services import export
from lightbox.services.auth import Principal
from lightbox.web import context, pages


def _caller(request: Request) -> Principal:
    if "authorization" in request.headers:
        return context.principal(request)
    return pages.page_principal(request)


async def study_zip(request: Request) -> Response:
    study = uids.require_uid(request.path_params["study"], "StudyInstanceUID")
    archive = context.archive(request)
    principal = _caller(request)
    found = await context.blocking(export.open_study_export, archive, principal, study)
    headers = {
        "Content-Disposition": f'attachment; filename="{found.filename}"',
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
    }
    # A sync iterator: Starlette pulls each chunk on a worker thread.
    return StreamingResponse(
        export.zip_chunks(archive, found), media_type="application/zip", headers=headers
    )


routes = [
    Route("/download/studies/{study}.zip", study_zip, methods=["GET"]),
]
