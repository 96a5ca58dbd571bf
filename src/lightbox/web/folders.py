"""Folder pages: the caller's folders, one folder's studies, collaborators,
switches and comments, and accepting an invitation.

- ``GET /folders``: the caller's folders (inbox first); ``POST``: a new one.
- ``GET /folders/{id}``: its studies (searchable, paged like /browse), its
  collaborators and comments; forms for what the caller's role allows.
- ``POST /folders/{id}/{action}``: members, remove-member, settings, add,
  remove, move, comment, delete. Every form is same-origin checked.
- ``GET|POST /invite/{token}``: join with the account signed in, or make one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import quote

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from lightbox.errors import BadRequest, Conflict, Forbidden, LightboxError, NotFound
from lightbox.services import auth, browse, folders, invitations
from lightbox.services.auth import Principal
from lightbox.services.folders import Role
from lightbox.web import context
from lightbox.web.browse import MODALITIES, Links, day, html_errors, modalities, person
from lightbox.web.errors import STATUS
from lightbox.web.pages import page_principal, render, start_session

FormHandler = Callable[[Request, Principal, str, FormData], Awaitable[str | None]]


@html_errors
async def folder_list(request: Request) -> Response:
    principal = page_principal(request)
    archive = context.archive(request)
    error = None
    if request.method == "POST":
        context.require_same_origin(request)
        form = await context.form(request)
        try:
            made = await context.blocking(
                folders.create_folder, archive, principal, str(form.get("name", "")),
                caller=context.caller(request))
            return RedirectResponse(f"/folders/{made.public_id}", status_code=303)
        except BadRequest as exc:
            error = exc.message
    entries = await context.blocking(folders.list_folders, archive, principal)
    return render(request, "folders.html", 400 if error else 200, entries=entries, error=error)


@html_errors
async def folder_page(request: Request) -> Response:
    return await _folder_page(request)


async def _folder_page(request: Request, notice: str | None = None, status: int = 200,
                       invited: invitations.Invited | None = None,
                       error: str | None = None) -> Response:
    principal = page_principal(request)
    archive = context.archive(request)
    public_id = request.path_params["id"]
    view = await context.blocking(folders.open_folder, archive, principal, public_id)
    listing = browse.parse_listing(request.query_params)
    found = await context.blocking(
        browse.list_studies, archive, principal, listing, view.folder.id)
    mine = await context.blocking(folders.list_folders, archive, principal)
    targets = [e.folder for e in mine if e.folder.id != view.folder.id and e.role is not None
               and Role(e.role).at_least(Role.UPLOADER)]
    admin = principal.is_admin and principal.whole_archive and not principal.read_only
    return render(
        request, "folder.html", status, view=view, found=found, listing=listing,
        links=Links(request, f"/folders/{quote(view.folder.public_id)}"),
        params=request.query_params, modality_choices=MODALITIES, person=person, day=day,
        modalities=modalities, targets=targets, roles=[r.value for r in Role],
        may_edit=view.may(Role.EDITOR, admin), may_own=view.may(Role.OWNER, admin),
        notice=notice, error=error, invited=invited, principal=principal,
    )


async def _members(request: Request, principal: Principal, folder: str,
                   form: FormData) -> str | None:
    role = folders.parse_role(str(form.get("role", "viewer")))
    who = str(form.get("who", "")).strip()
    if not who:
        raise BadRequest("name a user, or an e-mail address to invite")
    site = context.base_url(request).removesuffix("/dicom-web")
    invited = await context.blocking(
        invitations.invite, context.archive(request), principal, folder, who, role,
        site_url=site, caller=context.caller(request))
    request.scope["lightbox.invited"] = invited
    if invited.member is not None:
        return f"{invited.member.name} is now {invited.member.role} of this folder."
    return None


async def _remove_member(request: Request, principal: Principal, folder: str,
                         form: FormData) -> str | None:
    user = str(form.get("user", ""))
    await context.blocking(folders.remove_collaborator, context.archive(request), principal,
                           folder, user, caller=context.caller(request))
    if user == principal.user:
        request.scope["lightbox.left"] = True
    return f"{user} is no longer a collaborator."


def _checked(form: FormData, name: str) -> bool:
    return str(form.get(name, "") or "").lower() in ("on", "1", "true", "yes")


async def _settings(request: Request, principal: Principal, folder: str,
                    form: FormData) -> str | None:
    name = str(form.get("name", "") or "") or None
    await context.blocking(
        folders.update_folder, context.archive(request), principal, folder, name=name,
        allow_download=_checked(form, "download"), allow_reshare=_checked(form, "reshare"),
        caller=context.caller(request))
    return "Settings saved."


def _study(form: FormData) -> str:
    return str(form.get("study", "")).strip()


async def _add(request: Request, principal: Principal, folder: str,
               form: FormData) -> str | None:
    added = await context.blocking(folders.add_studies, context.archive(request), principal,
                                   folder, [_study(form)], caller=context.caller(request))
    return "The study was added." if added else "The study was already in this folder."


async def _remove(request: Request, principal: Principal, folder: str,
                  form: FormData) -> str | None:
    await context.blocking(folders.remove_study, context.archive(request), principal, folder,
                           _study(form), caller=context.caller(request))
    return "The study was taken out of this folder (it stays in the archive)."


async def _move(request: Request, principal: Principal, folder: str,
                form: FormData) -> str | None:
    await context.blocking(folders.move_study, context.archive(request), principal, folder,
                           str(form.get("to", "")), _study(form), caller=context.caller(request))
    return "The study was moved."


async def _comment(request: Request, principal: Principal, folder: str,
                   form: FormData) -> str | None:
    await context.blocking(folders.comment, context.archive(request), principal, folder,
                           str(form.get("text", "")), _study(form) or None)
    return "Comment added."


async def _delete(request: Request, principal: Principal, folder: str,
                  form: FormData) -> str | None:
    if str(form.get("confirm", "")) != "delete":
        raise BadRequest("type delete to confirm")
    await context.blocking(folders.delete_folder, context.archive(request), principal, folder,
                           caller=context.caller(request))
    request.scope["lightbox.left"] = True
    return None


_ACTIONS: dict[str, FormHandler] = {
    "members": _members, "remove-member": _remove_member, "settings": _settings,
    "add": _add, "remove": _remove, "move": _move, "comment": _comment, "delete": _delete,
}


@html_errors
async def folder_action(request: Request) -> Response:
    principal = page_principal(request)
    context.require_same_origin(request)
    handler = _ACTIONS.get(request.path_params["action"])
    if handler is None:
        raise NotFound("no such folder action")
    folder = request.path_params["id"]
    form = await context.form(request)
    try:
        notice = await handler(request, principal, folder, form)
    except (BadRequest, Conflict, Forbidden) as exc:
        # Said on the folder's page, which the caller may see (a member).
        return await _folder_page(request, error=exc.message, status=STATUS.get(type(exc), 400))
    if request.scope.get("lightbox.left"):
        return RedirectResponse("/folders", status_code=303)
    if "lightbox.invited" in request.scope and notice is None:
        return await _folder_page(request, invited=request.scope["lightbox.invited"])
    # Back to the page the form was on (the study page's "add to folder" form).
    back = str(form.get("back", ""))
    if back.startswith("/browse/studies/") and "//" not in back:
        return RedirectResponse(back, status_code=303)
    return await _folder_page(request, notice=notice)


# -- invitations ----------------------------------------------------------------------


@html_errors
async def invitation(request: Request) -> Response:
    archive = context.archive(request)
    token = request.path_params["token"]
    found = await context.blocking(invitations.open_invitation, archive, token)
    name = await context.blocking(invitations.folder_name, archive, found)
    try:
        signed_in: Principal | None = context.principal(request)
    except LightboxError:
        signed_in = None
    error = None
    if request.method == "POST":
        context.require_same_origin(request)
        form = await context.form(request)
        caller = context.caller(request)
        try:
            if signed_in is not None and form.get("join"):
                await context.blocking(invitations.accept_as, archive, signed_in, token, caller)
                return RedirectResponse("/folders", status_code=303)
            user = str(form.get("username", "")).strip()
            password = str(form.get("password", ""))
            if password != str(form.get("password2", "")):
                raise BadRequest("the two passwords differ")
            await context.blocking(invitations.accept_new_account, archive, token, user,
                                   password, caller)
            session = await context.blocking(auth.login, archive, user, password)
            return start_session(request, session, "/folders")
        except BadRequest as exc:
            error = exc.message
    return render(request, "invitation.html", 400 if error else 200, invitation=found,
                  folder_name=name, signed_in=signed_in, error=error, token=token)


routes: list[BaseRoute] = [
    Route("/folders", folder_list, methods=["GET", "POST"]),
    Route("/folders/{id}", folder_page, methods=["GET"]),
    Route("/folders/{id}/{action}", folder_action, methods=["POST"]),
    Route("/invite/{token}", invitation, methods=["GET", "POST"]),
]
