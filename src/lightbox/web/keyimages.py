"""``POST /key-images``: mark an image (or frame) as a key image, then back to the study."""

from __future__ import annotations

from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from lightbox.errors import BadRequest
from lightbox.services import keyimages
from lightbox.web import context


def _frame(text: str) -> int | None:
    if not text.strip():
        return None
    try:
        return int(text)
    except ValueError as exc:
        raise BadRequest(f"frame must be a number, not {text[:32]!r}") from exc


async def mark(request: Request) -> Response:
    # Cookie callers pass the same-origin check inside ``principal``.
    principal = context.principal(request)
    form = await context.form(request)
    fields = {k: str(form.get(k, "")).strip() for k in ("study", "series", "sop", "frame")}
    await context.blocking(
        keyimages.mark_key_image, context.archive(request), principal,
        study=fields["study"], series=fields["series"], sop=fields["sop"],
        frame=_frame(fields["frame"]),
    )
    return RedirectResponse(f"/browse/studies/{quote(fields['study'], safe='')}", status_code=303)


routes = [
    Route("/key-images", mark, methods=["POST"]),
]
