"""DELETE at study, series and instance level (PS3.18 §10.9 style)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from lightbox.services import manage
from lightbox.web import context


async def delete(request: Request) -> Response:
    study, series, sop = context.path_uids(request)
    archive = context.archive(request)
    principal = context.principal(request)
    cache = context.instance_cache(request)
    await context.blocking(
        manage.delete, archive, cache, principal, study, series, sop, context.caller(request)
    )
    return Response(status_code=204)


routes = [
    Route("/studies/{study}", delete, methods=["DELETE"]),
    Route("/studies/{study}/series/{series}", delete, methods=["DELETE"]),
    Route("/studies/{study}/series/{series}/instances/{instance}", delete, methods=["DELETE"]),
]
