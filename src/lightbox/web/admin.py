"""The administrators' audit page: the whole trail, newest first, filtered and
paged on the server, with the chain check and the two exports.

Only administrators with the whole archive may open it (members get a 403
page, anonymous callers the login page). Filter values are checked by the
audit service; anything it cannot read is a 400 page with the form kept.
"""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from lightbox.errors import BadRequest
from lightbox.services import audit
from lightbox.services.audit import Event
from lightbox.web import context
from lightbox.web.browse import html_errors
from lightbox.web.pages import PAGE_HEADERS, page_principal, render

FILTERS = ("action", "actor", "study", "from", "to")
# Suggestions for the action filter (any action may be typed).
ACTIONS = (
    "login", "logout", "query", "view", "frames", "retrieve", "download", "export",
    "upload", "import", "delete", "access_denied", "share_create", "share_open",
    "share_unlock", "share_download", "share_revoke", "user_add", "user_disable",
    "user_enable", "token_create", "token_revoke", "audit_export", "orphans_removed",
)
EXPORTS = {
    "json": ("application/x-ndjson", "jsonl"),
    "atna": ("application/xml; charset=utf-8", "xml"),
}


class AuditLinks:
    """Query strings of the audit page that keep the current filters."""

    def __init__(self, request: Request) -> None:
        self.params = {k: v for k in FILTERS if (v := request.query_params.get(k, "").strip())}

    def _url(self, path: str, **extra: str | int) -> str:
        query = urlencode({**self.params, **extra})
        return f"{path}?{query}" if query else path

    def newest(self) -> str:
        return self._url("/admin/audit")

    def older(self, before: int) -> str:
        return self._url("/admin/audit", before=before)

    def newer(self, after: int) -> str:
        return self._url("/admin/audit", after=after)

    def export(self, form: str) -> str:
        return self._url("/admin/audit/export", format=form)


def short_agent(value: str | None, limit: int = 48) -> str:
    """A user agent cut to fit a table cell (the full one goes in a tooltip)."""
    if not value:
        return ""
    return value if len(value) <= limit else value[: limit - 1] + "…"


@html_errors
async def audit_page(request: Request) -> Response:
    principal = page_principal(request)
    audit.require_auditor(principal)
    archive = context.archive(request)
    links = AuditLinks(request)
    try:
        query = audit.parse_query(request.query_params)
    except BadRequest as exc:
        return render(request, "admin_audit.html", 400, error=exc.message, page=None,
                      verdict=None, params=links.params, links=links, actions=ACTIONS,
                      agent=short_agent)
    page = await context.blocking(audit.search, archive.db, principal, query)
    verdict = await context.blocking(audit.verify, archive.db)
    return render(request, "admin_audit.html", error=None, page=page, verdict=verdict,
                  params=links.params, links=links, actions=ACTIONS, agent=short_agent)


@html_errors
async def audit_export(request: Request) -> Response:
    principal = page_principal(request)
    audit.require_auditor(principal)
    form = request.query_params.get("format", "json")
    if form not in EXPORTS:
        raise BadRequest("format: json or atna")
    query = audit.parse_query(request.query_params)  # the page position is ignored
    archive = context.archive(request)
    caller = context.caller(request)
    # Reading the trail is itself recorded, before the first byte goes out.
    event = Event("audit_export", principal.user, source=caller.source,
                  user_agent=caller.user_agent,
                  detail={"format": form, **AuditLinks(request).params})
    await context.blocking(archive.audit.record, event, now=True)
    lines = audit.export_lines(archive.db, principal, query, form, archive.settings.aet)
    media, suffix = EXPORTS[form]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    headers = {
        **PAGE_HEADERS,
        "Content-Disposition": f'attachment; filename="lightbox-audit-{stamp}.{suffix}"',
    }
    return StreamingResponse((line.encode() for line in lines), media_type=media,
                             headers=headers)


routes: list[BaseRoute] = [
    Route("/admin/audit", audit_page),
    Route("/admin/audit/export", audit_export),
]
