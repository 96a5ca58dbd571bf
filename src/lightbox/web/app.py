"""Builds the Starlette application from an open Archive."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp

from lightbox import errors
from lightbox.archive import Archive
from lightbox.services.auth import Authenticator
from lightbox.services.retrieve import InstanceCache
from lightbox.web import (
    account,
    admin,
    browse,
    download,
    folders,
    keyimages,
    manage,
    oidc,
    pages,
    qido,
    share,
    share_viewer,
    stow,
    upload,
    viewer,
    wado,
    wadouri,
)
from lightbox.web.audit import AuditTrail
from lightbox.web.errors import domain_error, http_error, unexpected_error
from lightbox.web.fastpath import FramesFastPath
from lightbox.web.observability import Metrics, RequestLog
from lightbox.web.observability import routes as ops_routes
from lightbox.web.security import RefuseNul, SecurityHeaders


async def _home(_request: object) -> Response:
    return RedirectResponse("/browse", status_code=303)


def create_app(archive: Archive) -> Starlette:
    """The HTTP application; the archive is owned by the caller."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        # A worker process going away writes its last counted audit events.
        archive.audit.flush()

    dicomweb = [*qido.routes, *stow.routes, *manage.routes, *wado.routes]
    middleware = [
        Middleware(RequestLog, metrics=metrics),
        Middleware(RefuseNul),
        Middleware(AuditTrail, auditor=archive.audit),
    ]
    if archive.settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(archive.settings.cors_origins),
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=["Authorization", "Content-Type", "Accept"],
                expose_headers=["Warning", "Content-Range"],
            )
        )
    app = Starlette(
        routes=[
            Route("/", _home),
            *ops_routes,
            *pages.routes,
            *oidc.routes,
            *share.routes,
            *share_viewer.routes,
            *account.routes,
            *admin.routes,
            *browse.routes,
            *upload.routes,
            *download.routes,
            *folders.routes,
            *keyimages.routes,
            *viewer.routes,
            *wadouri.routes,
            Mount("/dicom-web", routes=dicomweb),
        ],
        middleware=middleware,
        exception_handlers={
            pages.LoginRequired: pages.login_required,
            errors.LightboxError: domain_error,
            HTTPException: http_error,
            Exception: unexpected_error,
        },
        lifespan=lifespan,
    )
    app.state.archive = archive
    app.state.authenticator = Authenticator(archive)
    app.state.instance_cache = InstanceCache()
    app.state.metrics = metrics
    return app


def create_asgi(archive: Archive) -> ASGIApp:
    """The application behind the frames fast path (what the server runs), inside
    the security headers (outermost, so fast frames and 500s carry them too)."""
    app = create_app(archive)
    fast = FramesFastPath(
        app,
        archive=archive,
        authenticator=app.state.authenticator,
        cache=app.state.instance_cache,
        metrics=app.state.metrics,
    )
    return SecurityHeaders(fast, public_url=archive.settings.public_url)
