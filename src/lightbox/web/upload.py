"""The upload page: files and folders from the browser, sent by its script with STOW-RS.

The page itself stores nothing: its JavaScript posts batches to
``/dicom-web/studies`` with the session cookie (same origin), so uploads take
the one ingest path like every other source.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from lightbox.web import pages


async def upload_page(request: Request) -> Response:
    principal = pages.page_principal(request)
    can_upload = not principal.read_only
    return pages.render(request, "upload.html", 200 if can_upload else 403,
                        can_upload=can_upload)


routes = [
    Route("/upload", upload_page, methods=["GET"]),
]
