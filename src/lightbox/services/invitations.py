"""Inviting people into a folder: by user name, or by e-mail address.

Someone who already has an account (matched by name or e-mail address) is
added at once. Anyone else gets an invitation: a long random token, stored
hashed, valid for INVITATION_LIFETIME, sent by e-mail when SMTP is
configured (and shown to the inviter either way, to pass on in person).
Opening ``/invite/<token>`` lets them create an account in the inviter's
organisation, or join with the account they are signed in with; they then
are a collaborator of the folder with the role they were invited with.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import smtplib
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage

from sqlalchemy import Connection

from lightbox.archive import Archive
from lightbox.errors import BadRequest, NotFound
from lightbox.index import accounts
from lightbox.index import folders as index
from lightbox.index import invitations as invitations_index
from lightbox.index.folders import Member
from lightbox.index.invitations import InvitationRow
from lightbox.services import access, folders
from lightbox.services.audit import Caller, Event
from lightbox.services.auth import EMAIL, Principal, hash_password
from lightbox.settings import SMTP_SECURITY, Settings

log = logging.getLogger("lightbox.invitations")

INVITATION_LIFETIME = timedelta(days=14)
TOKEN_PREFIX = "lbi_"
_GONE = "this invitation does not exist, has expired or was used already"


def require_email(text: str) -> str:
    text = text.strip()
    if not EMAIL.fullmatch(text):
        raise BadRequest(f"not an e-mail address: {text[:254]!r}")
    return text


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Invited:
    """What inviting did: added an existing user, or made an invitation."""

    member: Member | None = None
    email: str | None = None
    url: str | None = None  # the invitation link, shown once
    emailed: bool = False
    mail_error: str | None = None


def invite(archive: Archive, principal: Principal, folder: str, who: str, role: folders.Role,
           *, site_url: str, caller: Caller | None = None) -> Invited:
    """Add ``who`` (a user name or an e-mail address) to ``folder`` with ``role``."""
    with archive.db.read() as conn:
        person = folders.find_person(conn, who)
    if person is not None:
        return Invited(member=folders.set_collaborator(
            archive, principal, folder, person.name, role, caller=caller))
    if "@" not in who:
        raise NotFound(f"no user {who.strip()[:128]!r} (invite by e-mail address instead)")
    email = require_email(who)
    view = folders.managed_folder(archive, principal, folder)
    if view.is_inbox:
        raise BadRequest("an inbox is yours alone: make a folder to collaborate")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with archive.db.write() as conn:
        invitations_index.add_invitation(
            conn, token_hash=_digest(token), email=email,
            organisation=view.folder.organisation_id, folder_id=view.folder.id, role=role.value,
            invited_by=principal.user, expires_at=datetime.now(UTC) + INVITATION_LIFETIME)
    url = f"{site_url.rstrip('/')}/invite/{token}"
    archive.audit.record(Event(
        "folder_invite", principal.user, source=(caller or Caller()).source,
        user_agent=(caller or Caller()).user_agent,
        detail={"folder": view.folder.public_id, "email": email, "role": role.value}), now=True)
    error = None
    if archive.settings.smtp_host:
        try:
            send_invitation(archive.settings, email, url, principal.user, view.folder.name)
        except (OSError, smtplib.SMTPException) as exc:
            error = f"the e-mail could not be sent ({type(exc).__name__}); pass the link on"
            log.warning("invitation mail to %s failed: %s", email, type(exc).__name__)
    return Invited(email=email, url=url, emailed=bool(archive.settings.smtp_host) and not error,
                   mail_error=error)


def send_invitation(settings: Settings, email: str, url: str, inviter: str,
                    folder_name: str) -> None:
    """The invitation mail, through the configured SMTP server."""
    message = EmailMessage()
    message["From"] = settings.smtp_from or f"lightbox@{settings.smtp_host}"
    message["To"] = email
    message["Subject"] = f"{inviter} invites you to the folder {folder_name!r} on Lightbox"
    message.set_content(
        f"{inviter} invites you to collaborate on the folder {folder_name!r}.\n\n"
        f"Open this link to create your account or sign in and join:\n{url}\n\n"
        f"The link works once and expires in {INVITATION_LIFETIME.days} days.\n"
    )
    security = settings.smtp_security.strip().lower()
    if security not in SMTP_SECURITY:
        raise BadRequest(f"smtp_security must be {', '.join(SMTP_SECURITY)}")
    context = ssl.create_default_context()
    smtp: smtplib.SMTP
    if security == "tls":
        smtp = smtplib.SMTP_SSL(settings.smtp_host, settings.smtp_port, timeout=15,
                                context=context)
    else:
        smtp = smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=15)
    with smtp:
        if security == "starttls":
            smtp.starttls(context=context)
        if settings.smtp_user:
            smtp.login(settings.smtp_user, settings.smtp_password)
        smtp.send_message(message)


def open_invitation(archive: Archive, token: str) -> InvitationRow:
    """The pending invitation a token names; one NotFound for unknown, used and expired."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 128:
        raise NotFound(_GONE)
    with archive.db.read() as conn:
        found = invitations_index.invitation(conn, _digest(token))
    if found is None or found.accepted_at is not None or found.expires_at <= datetime.now(UTC):
        raise NotFound(_GONE)
    return found


def folder_name(archive: Archive, invitation: InvitationRow) -> str:
    with archive.db.read() as conn:
        found = index.folder_by_id(conn, invitation.folder_id) if invitation.folder_id else None
    return found.name if found is not None else ""


def accept_new_account(archive: Archive, token: str, name: str, password: str,
                       caller: Caller | None = None) -> str:
    """Create the invitee's account (in the inviter's organisation) and join the folder."""
    invitation = open_invitation(archive, token)
    if not name or len(name) > 128 or not name.isprintable() or "@" in name:
        raise BadRequest("a user name needs 1 to 128 printable characters, without '@'")
    hashed = hash_password(password, name)
    with archive.db.write() as conn:
        if not invitations_index.accept_invitation(conn, invitation.id):
            raise NotFound(_GONE)
        user = accounts.add_user(conn, name, hashed, is_admin=False)
        index.set_profile(conn, user.id, email=invitation.email,
                          organisation=invitation.organisation_id)
        _join(conn, invitation, user.id)
    _accepted(archive, invitation, name, caller)
    return name


def accept_as(archive: Archive, principal: Principal, token: str,
              caller: Caller | None = None) -> None:
    """Join the folder with the account the invitee is signed in with."""
    invitation = open_invitation(archive, token)
    if principal.user_id is None or principal.studies is not None or principal.read_only:
        raise BadRequest("sign in with your own account to accept an invitation")
    with archive.db.write() as conn:
        if not invitations_index.accept_invitation(conn, invitation.id):
            raise NotFound(_GONE)
        _join(conn, invitation, principal.user_id)
    _accepted(archive, invitation, principal.user, caller)


def _join(conn: Connection, invitation: InvitationRow, user_id: int) -> None:
    if invitation.folder_id is not None and invitation.role is not None:
        if index.folder_by_id(conn, invitation.folder_id) is None:
            raise NotFound(_GONE)
        current = index.role_of(conn, invitation.folder_id, user_id)
        role = folders.Role(invitation.role)
        if current is None or not folders.Role(current).at_least(role):
            index.set_member(conn, invitation.folder_id, user_id, role.value)


def _accepted(archive: Archive, invitation: InvitationRow, user: str,
              caller: Caller | None) -> None:
    access.invalidate()
    caller = caller or Caller()
    archive.audit.record(Event(
        "invitation_accept", user, source=caller.source, user_agent=caller.user_agent,
        detail={"email": invitation.email, "role": invitation.role,
                "invited_by": invitation.invited_by}), now=True)
