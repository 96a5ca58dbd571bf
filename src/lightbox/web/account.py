"""The signed-in user's own page: personal API tokens (create, list, revoke).

A new token's value is shown once, on the page that created it; only its
hash is kept. Sessions of the browser are tokens too and are listed as such.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from lightbox.errors import BadRequest, LightboxError
from lightbox.services import auth
from lightbox.services.audit import Event
from lightbox.web import context
from lightbox.web.pages import page_principal, render

MAX_LIFETIME_DAYS = 365


async def account(request: Request) -> Response:
    principal = page_principal(request)
    archive = context.archive(request)
    new_token, error = None, None
    if request.method == "POST":
        context.require_same_origin(request)
        try:
            new_token = await _create(request, principal.user)
        except LightboxError as exc:
            error = exc.message
    tokens = await context.blocking(auth.list_tokens, archive, principal.user)
    shown = [t for t in reversed(tokens) if not t.revoked][:50]
    return render(request, "account.html", 400 if error else 200, tokens=shown,
                  new_token=new_token, error=error, session_label=auth.SESSION_LABEL)


async def _create(request: Request, user: str) -> str:
    principal = context.principal(request)
    principal.require_write()  # a read-only or study-scoped token cannot mint tokens
    if principal.studies is not None:
        raise BadRequest("a token scoped to studies cannot create tokens")
    form = await context.form(request)
    label = str(form.get("label", "")).strip()[:128] or "personal"
    lifetime = auth.parse_duration(str(form.get("expires", "30d")) or "30d")
    if lifetime.days > MAX_LIFETIME_DAYS:
        raise BadRequest(f"a token lives at most {MAX_LIFETIME_DAYS} days")
    archive = context.archive(request)
    token = await context.blocking(auth.create_token, archive, user=user, expires=lifetime,
                                   label=label)
    caller = context.caller(request)
    archive.audit.record(Event("token_create", user, source=caller.source,
                               user_agent=caller.user_agent, detail={"label": label}), now=True)
    return token


async def revoke(request: Request) -> Response:
    principal = page_principal(request)
    context.require_same_origin(request)
    principal.require_write()
    archive = context.archive(request)
    try:
        token_id = int(request.path_params["token_id"])
    except ValueError as exc:
        raise BadRequest("not a token id") from exc
    if not 0 < token_id < 2**31:  # the ids the index hands out
        raise BadRequest("not a token id")
    await context.blocking(auth.revoke_token_id, archive, token_id, user=principal.user)
    caller = context.caller(request)
    archive.audit.record(Event("token_revoke", principal.user, source=caller.source,
                               user_agent=caller.user_agent, detail={"token": token_id}),
                         now=True)
    return RedirectResponse("/account", status_code=303)


routes = [
    Route("/account", account, methods=["GET", "POST"]),
    Route("/account/tokens/{token_id}/revoke", revoke, methods=["POST"]),
]
