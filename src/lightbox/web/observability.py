"""Request ids, structured access logs, Prometheus metrics, /healthz and /metrics."""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from sqlalchemy import text
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lightbox.web import context

access_log = logging.getLogger("lightbox.access")


class Metrics:
    """The process's Prometheus registry (one per app, so tests can run several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lightbox_http_requests_total",
            "HTTP requests",
            ["method", "family", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lightbox_http_request_seconds",
            "HTTP request latency",
            ["family"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )


# Paths whose second segment is a credential: share links and invitations.
_PATH_TOKEN = re.compile(r"^/(s|invite)/[^/]+")


def redact(path: str) -> str:
    """A share link's or an invitation's token never reaches the logs.

    Only the path is logged: never the query string, headers (Authorization,
    cookies) or bodies (passwords, passcodes).
    """
    return _PATH_TOKEN.sub(r"/\1/<token>", path)


def _family(path: str) -> str:
    """A low-cardinality name for a path (never a UID)."""
    if not path.startswith("/dicom-web"):
        return path.split("/")[1] if path.count("/") else path
    for name in ("frames", "metadata", "rendered", "thumbnail", "bulkdata"):
        if f"/{name}" in path:
            return name
    return "dicom-web"


class RequestLog:
    """ASGI middleware: X-Request-Id, one JSON access-log line, metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = secrets.token_hex(8)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            family = _family(scope["path"])
            self.metrics.requests.labels(scope["method"], family, str(status)).inc()
            self.metrics.latency.labels(family).observe(elapsed)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(
                    json.dumps(
                        {
                            "request_id": request_id,
                            "method": scope["method"],
                            "path": redact(scope["path"]),
                            "status": status,
                            "ms": round(elapsed * 1000, 2),
                            "client": (scope.get("client") or ("", 0))[0],
                        }
                    )
                )


async def healthz(request: Request) -> Response:
    archive = context.archive(request)

    def check() -> None:
        with archive.db.read() as conn:
            conn.execute(text("SELECT 1"))

    await context.blocking(check)
    return PlainTextResponse("ok")


async def metrics(request: Request) -> Response:
    registry: Any = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


routes = [Route("/healthz", healthz), Route("/metrics", metrics)]
