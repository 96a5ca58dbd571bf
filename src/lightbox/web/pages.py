"""Server-rendered pages: the shared frame, login and logout.

Pages are Jinja2 templates (autoescaped) with small plain JavaScript modules
from ``static/``. A page that needs a signed-in user calls ``page_principal``;
without a session the browser is sent to the login page and back afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from lightbox.archive import Archive
from lightbox.errors import LightboxError, Unauthenticated
from lightbox.services import auth
from lightbox.services.audit import Caller, Event
from lightbox.services.auth import Principal
from lightbox.web import context
from lightbox.web.security import https_request

HERE = Path(__file__).parent
_env = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)

# Pages are never framed, never sniffed, and load scripts only from here.
PAGE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class LoginRequired(Exception):
    """Raised by page handlers; answered with a redirect to the login page."""

    def __init__(self, next_url: str) -> None:
        super().__init__(next_url)
        self.next_url = next_url


def render(request: Request, template: str, status_code: int = 200, **values: Any) -> HTMLResponse:
    user = request.scope.get("lightbox.principal")
    html = _env.get_template(template).render(request=request, user=user, **values)
    return HTMLResponse(html, status_code=status_code, headers=PAGE_HEADERS)


def page_principal(request: Request) -> Principal:
    """The signed-in user of a page request, or LoginRequired."""
    try:
        return context.principal(request)
    except Unauthenticated as exc:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(target) from exc


async def login_required(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LoginRequired)
    return RedirectResponse(f"/login?next={quote(exc.next_url, safe='')}", status_code=303)


def safe_next(value: str | None) -> str:
    """Only a path on this site: never an absolute or scheme-relative URL."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return "/"
    return value


async def login_page(request: Request) -> Response:
    next_url = safe_next(request.query_params.get("next"))
    if request.method == "GET":
        return render(request, "login.html", next_url=next_url, error=None)
    context.require_same_origin(request)
    form = await context.form(request)
    name, password = str(form.get("username", "")), str(form.get("password", ""))
    next_url = safe_next(str(form.get("next", "")) or None)
    archive = context.archive(request)
    caller = context.caller(request)
    try:
        token = await context.blocking(auth.login, archive, name, password)
    except LightboxError as exc:
        _audit(archive, "login", name, "failure", caller)
        return render(request, "login.html", 401, next_url=next_url, error=exc.message)
    _audit(archive, "login", name, "success", caller)
    return start_session(request, token, next_url)


def start_session(request: Request, token: str, next_url: str) -> Response:
    """To ``next_url`` with the session cookie holding ``token``."""
    response = RedirectResponse(next_url, status_code=303)
    response.set_cookie(
        context.SESSION_COOKIE,
        token,
        max_age=int(auth.SESSION_LIFETIME.total_seconds()),
        httponly=True,
        samesite="lax",
        secure=https_request(request),
        path="/",
    )
    return response


def _audit(archive: Archive, action: str, actor: str, outcome: str, caller: Caller) -> None:
    # Written before the answer goes out (a sign-in is a security event).
    archive.audit.record(
        Event(action, actor[:128] or "anonymous", outcome, source=caller.source,
              user_agent=caller.user_agent),
        now=True,
    )


async def logout(request: Request) -> Response:
    context.require_same_origin(request)
    token = context.session_token(request)
    if token is not None:
        archive = context.archive(request)
        try:
            who = context.principal(request).user
        except LightboxError:
            who = "anonymous"
        await context.blocking(auth.revoke_token, archive, token)
        request.app.state.authenticator.forget(token)
        _audit(archive, "logout", who, "success", context.caller(request))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(context.SESSION_COOKIE, path="/")
    return response


routes = [
    Route("/login", login_page, methods=["GET", "POST"]),
    Route("/logout", logout, methods=["POST"]),
    Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
]
