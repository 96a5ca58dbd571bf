"""Single sign-on routes: off to the identity provider, and back.

``/login/oidc`` keeps the attempt's state, nonce, PKCE verifier and the page
to return to in a short-lived cookie that only ``/login/oidc/*`` sees, then
sends the browser to the provider. ``/login/oidc/callback`` checks the state
against that cookie, lets the service exchange the code and validate the ID
token, and starts a session like a password login does.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from lightbox.archive import Archive
from lightbox.errors import BadRequest, LightboxError, NotFound, Unauthenticated, Unavailable
from lightbox.services import oidc
from lightbox.services.audit import Event
from lightbox.web import context, pages
from lightbox.web.security import https_request

STATE_COOKIE = "lightbox_oidc"
STATE_PATH = "/login/oidc"
STATE_SECONDS = 600  # time to sign in at the provider
CALLBACK = "/login/oidc/callback"


@dataclass(frozen=True)
class Pending:
    """What the callback needs from the start of the attempt."""

    state: str
    nonce: str
    code_verifier: str
    next_url: str

    def encode(self) -> str:
        raw = json.dumps([self.state, self.nonce, self.code_verifier, self.next_url])
        return base64.urlsafe_b64encode(raw.encode()).decode()

    @classmethod
    def decode(cls, value: str | None) -> Pending:
        if not value:
            raise BadRequest("the sign-in was not started in this browser or took too long; "
                             "please try again")
        try:
            items = json.loads(base64.urlsafe_b64decode(value.encode()))
        except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
            raise BadRequest("the sign-in state is damaged; please try again") from exc
        if not (isinstance(items, list) and len(items) == 4
                and all(isinstance(item, str) for item in items)):
            raise BadRequest("the sign-in state is damaged; please try again")
        return cls(items[0], items[1], items[2], pages.safe_next(items[3]))


def _redirect_uri(request: Request) -> str:
    return context.origin(request) + CALLBACK


def _status(exc: LightboxError) -> int:
    if isinstance(exc, Unauthenticated):
        return 401
    if isinstance(exc, Unavailable):
        return 503
    return 400


def _failed(request: Request, exc: LightboxError, next_url: str = "/") -> Response:
    """The login page with the reason; the attempt's cookie is dropped."""
    response = pages.render(request, "login.html", _status(exc), next_url=next_url,
                            error=exc.message)
    response.delete_cookie(STATE_COOKIE, path=STATE_PATH)
    return response


def _audit(request: Request, archive: Archive, actor: str, outcome: str) -> None:
    caller = context.caller(request)
    # Written before the answer goes out (a sign-in is a security event).
    archive.audit.record(
        Event("login", actor[:128] or "anonymous", outcome, source=caller.source,
              user_agent=caller.user_agent, detail={"method": "oidc"}),
        now=True,
    )


async def start(request: Request) -> Response:
    archive = context.archive(request)
    if not oidc.enabled(archive.settings):
        raise NotFound("single sign-on is not configured")
    next_url = pages.safe_next(request.query_params.get("next"))
    try:
        attempt = await context.blocking(oidc.authorize, archive.settings,
                                         _redirect_uri(request))
    except LightboxError as exc:
        return _failed(request, exc, next_url)
    pending = Pending(attempt.state, attempt.nonce, attempt.code_verifier, next_url)
    response = RedirectResponse(attempt.url, status_code=303)
    response.headers["Cache-Control"] = "no-store"
    response.set_cookie(
        STATE_COOKIE,
        pending.encode(),
        max_age=STATE_SECONDS,
        httponly=True,
        # Lax: the provider's redirect back is a top-level GET, which carries it.
        samesite="lax",
        secure=https_request(request),
        path=STATE_PATH,
    )
    return response


async def callback(request: Request) -> Response:
    archive = context.archive(request)
    if not oidc.enabled(archive.settings):
        raise NotFound("single sign-on is not configured")
    params = request.query_params
    next_url = "/"
    try:
        error = params.get("error")
        if error:
            # Shown without checking state: nothing is signed in on this path.
            described = params.get("error_description", "")[:200]
            reason = "you declined the sign-in" if error == "access_denied" else error[:100]
            raise Unauthenticated(f"the identity provider did not sign you in: {reason}"
                                  + (f" ({described})" if described else ""))
        pending = Pending.decode(request.cookies.get(STATE_COOKIE))
        next_url = pending.next_url
        if not hmac.compare_digest(params.get("state", "").encode(), pending.state.encode()):
            raise BadRequest("the sign-in answer does not match this browser's attempt "
                             "(state); please try again")
        code = params.get("code", "")
        if not code:
            raise BadRequest("the identity provider sent no authorization code")
        identity = await context.blocking(
            oidc.identify, archive.settings, redirect_uri=_redirect_uri(request), code=code,
            code_verifier=pending.code_verifier, nonce=pending.nonce,
        )
    except LightboxError as exc:
        _audit(request, archive, "anonymous", "failure")
        return _failed(request, exc, next_url)
    try:
        signed_in = await context.blocking(oidc.sign_in, archive, identity)
    except LightboxError as exc:
        _audit(request, archive, identity.name, "failure")
        return _failed(request, exc, next_url)
    _audit(request, archive, signed_in.user, "success")
    response = pages.start_session(request, signed_in.token, next_url)
    response.delete_cookie(STATE_COOKIE, path=STATE_PATH)
    return response


routes = [
    Route("/login/oidc", start, methods=["GET"]),
    Route(CALLBACK, callback, methods=["GET"]),
]
