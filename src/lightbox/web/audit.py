"""ASGI middleware that turns DICOMweb and download requests into audit events.

The route has authenticated the caller (``lightbox.principal`` in the scope)
and answered; here the request is classified by its path: a search, a view
(metadata, rendered images, thumbnails), a retrieve, frames, a download, a
deletion. Stores are recorded by the ingest adapters, which know what was
stored; sign-ins by the login page.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lightbox.services.audit import Auditor, Event
from lightbox.services.auth import Principal

_STUDY_PATH = re.compile(
    r"/dicom-web/studies(?:/(?P<study>[0-9.]{1,64})"
    r"(?:/series/(?P<series>[0-9.]{1,64}))?(?:/instances/[0-9.]{1,64})?)?"
    r"(?P<rest>/[a-z]+)?(?:/.*)?"
)
_DOWNLOAD = re.compile(r"/download/studies/(?P<study>[0-9.]{1,64})\.zip")
# The study browser: a study's page and its series thumbnails are views too.
_PAGE_VIEW = re.compile(
    r"/browse/(?:studies/(?P<study>[0-9.]{1,64})|thumbnails/(?P<thumb>[0-9.]{1,64})"
    r"/(?P<series>[0-9.]{1,64})\.jpg)"
)
_SEARCH = re.compile(r"/dicom-web/(?:series|instances)")
_COUNTED = {"frames", "view", "retrieve"}


def classify(method: str, path: str, query: str) -> tuple[str, str | None, str | None] | None:
    """(action, study, series) for an audited request, None for anything else."""
    if method == "GET" and _SEARCH.fullmatch(path):
        return "query", None, None
    found = _DOWNLOAD.fullmatch(path)
    if found and method == "GET":
        return "download", found["study"], None
    found = _PAGE_VIEW.fullmatch(path)
    if found and method == "GET":
        return "view", found["study"] or found["thumb"], found["series"]
    if path == "/wado" and method == "GET":
        study = parse_qs(query).get("studyUID", [None])[0]
        return "retrieve", study, None
    found = _STUDY_PATH.fullmatch(path)
    if found is None:
        return None
    study, series, rest = found["study"], found["series"], found["rest"] or ""
    if method != "GET":
        return None  # stores and deletions are recorded where their outcome is known
    if rest in ("/series", "/instances") or study is None:
        return "query", study, series
    if rest in ("/frames", "/bulkdata"):
        return "frames", study, series
    if rest in ("/metadata", "/rendered", "/thumbnail"):
        return "view", study, series
    return "retrieve", study, series


def client_of(scope: Scope) -> tuple[str | None, str | None]:
    """The caller's address and user agent."""
    client = scope.get("client")
    agent = next((v for k, v in scope.get("headers", []) if k == b"user-agent"), None)
    return (client[0] if client else None), (agent.decode("latin-1") if agent else None)


def actor_of(scope: Scope) -> str:
    principal = scope.get("lightbox.principal")
    return principal.user if isinstance(principal, Principal) else "anonymous"


class StatusNote:
    """A ``send`` that passes messages on and remembers the response status
    (500 until the application answers)."""

    def __init__(self, send: Send) -> None:
        self.status = 500
        self._send = send

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self._send(message)


class AuditTrail:
    """Records one event per audited request, after its answer is known."""

    def __init__(self, app: ASGIApp, auditor: Auditor) -> None:
        self.app = app
        self.auditor = auditor

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        query = scope.get("query_string", b"").decode("latin-1")
        kind = classify(scope["method"], scope["path"], query)
        if kind is None:
            await self.app(scope, receive, send)
            return
        answered = StatusNote(send)
        try:
            await self.app(scope, receive, answered)
        finally:
            self._record(scope, kind, answered.status, query)

    def _record(self, scope: Scope, kind: tuple[str, str | None, str | None], status: int,
                query: str) -> None:
        action, study, series = kind
        source, agent = client_of(scope)
        actor = actor_of(scope)
        if status in (401, 403):
            self.auditor.record(Event("access_denied", actor, "failure", study, series,
                                      source=source, user_agent=agent,
                                      detail={"path": scope["path"][:300], "status": status}))
            return
        if (status >= 400 and action != "query") or 300 <= status < 400:
            return  # not found, malformed, or sent to sign in: nothing was disclosed
        if action in _COUNTED:
            self.auditor.count(action, actor, study, source=source, user_agent=agent)
            return
        detail: dict[str, object] = {"status": status}
        if action == "query":
            detail["query"] = query[:500]
        self.auditor.record(
            Event(action, actor, "success" if status < 400 else "failure", study, series,
                  source=source, user_agent=agent, detail=detail)
        )
