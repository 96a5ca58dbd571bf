"""Share links: a study shown to whoever holds a link, within limits.

A link names one study, an expiry (required, at most a year), who may use it
(anyone with the link; signed-in users of the creator's organisation; or
collaborators of the folder it was made from), an optional passcode, whether
the study may be downloaded, and whether it is de-identified on the way out. The link's
token appears only in the URL; the index keeps its SHA-256.

Holders of a link get a Principal scoped to that one study, read-only, so
the ordinary DICOMweb routes serve them unchanged. A passcode is exchanged
for a short-lived unlock token (stored hashed too); after MAX_FAILURES wrong
passcodes in FAILURE_WINDOW the link is locked until the window has passed,
counted in the index so that every server process sees the same count.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from argon2 import PasswordHasher
from sqlalchemy import Connection

from lightbox.archive import Archive
from lightbox.dicom import uids
from lightbox.errors import BadRequest, Forbidden, NotFound, Unauthenticated
from lightbox.index import accounts
from lightbox.index import browse as browse_index
from lightbox.index import folders as folder_index
from lightbox.index import shares as index
from lightbox.services import access as access_service
from lightbox.services.audit import Caller, Event
from lightbox.services.auth import Principal, principal_of, verify_password
from lightbox.services.deidentify import UidMapper

DEFAULT_LIFETIME = timedelta(days=30)
MAX_LIFETIME = timedelta(days=365)
UNLOCK_LIFETIME = timedelta(hours=12)
MAX_FAILURES = 5
FAILURE_WINDOW = timedelta(minutes=15)
MIN_PASSCODE, MAX_PASSCODE = 4, 128
UNLOCK_PREFIX = "lbs_"
_hasher = PasswordHasher()
_GONE = "this link does not exist, has expired or was revoked"


class Access(enum.StrEnum):
    """Who may use a link besides holding it."""

    ANYONE = "anyone"
    ORGANISATION = "organisation"
    COLLABORATORS = "collaborators"

    @property
    def needs_sign_in(self) -> bool:
        return self is not Access.ANYONE


@dataclass(frozen=True)
class ShareLink:
    """A link as its owner and the share pages see it (never its token)."""

    id: str
    study_instance_uid: str
    creator: str
    created_at: datetime
    expires_at: datetime
    has_passcode: bool
    allow_download: bool
    deidentify: bool
    access: Access
    revoked_at: datetime | None
    # Internal: the index row id and the de-identification secret.
    row_id: int
    uid_secret: str | None
    folder_id: int | None = None
    organisation_id: int | None = None

    def state(self, now: datetime | None = None) -> str:
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if self.expires_at <= (now or datetime.now(UTC)) else "active"

    @property
    def mapper(self) -> UidMapper | None:
        return UidMapper(self.uid_secret) if self.deidentify and self.uid_secret else None

    def public_uid(self, uid: str) -> str:
        mapper = self.mapper
        return mapper.public(uid) if mapper is not None else uid


@dataclass(frozen=True)
class NewShare:
    """A link just made: its token is shown this once."""

    link: ShareLink
    token: str


def _from_row(row: index.LinkRow) -> ShareLink:
    return ShareLink(
        id=row.public_id, study_instance_uid=row.study_instance_uid, creator=row.creator,
        created_at=row.created_at, expires_at=row.expires_at,
        has_passcode=row.passcode_hash is not None, allow_download=row.allow_download,
        deidentify=row.deidentify, access=Access(row.access), revoked_at=row.revoked_at,
        row_id=row.id, uid_secret=row.uid_secret, folder_id=row.folder_id,
        organisation_id=row.organisation_id,
    )


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_access(text: str) -> Access:
    text = text.strip().lower()
    try:
        return Access("organisation" if text in ("signed-in", "organization") else text)
    except ValueError as exc:
        raise BadRequest("access must be 'anyone', 'organisation' or 'collaborators'") from exc


def _check_passcode_rules(passcode: str) -> None:
    if not MIN_PASSCODE <= len(passcode) <= MAX_PASSCODE or not passcode.isprintable():
        raise BadRequest(f"a passcode needs {MIN_PASSCODE} to {MAX_PASSCODE} printable characters")


def create_share(
    archive: Archive,
    principal: Principal,
    *,
    study: str,
    expires: timedelta | None = None,
    passcode: str | None = None,
    allow_download: bool = True,
    deidentify: bool = False,
    access: Access = Access.ANYONE,
    folder: str | None = None,
) -> NewShare:
    """Make a link to ``study``; the creator must be allowed to pass it on.

    Read-only and study-scoped callers (tokens handed to viewers, other
    links) cannot pass their access on, nor members whose folders do not
    allow re-sharing. A collaborators link names the folder (public id) it
    was made from; the study must be in it and the creator one of its
    collaborators.
    """
    principal.require_write()
    if principal.studies is not None:
        raise Forbidden("a token limited to some studies cannot create share links")
    uids.require_uid(study, "StudyInstanceUID")
    access_service.require_reshare(principal, study)
    if allow_download and not access_service.may_download(principal, study):
        raise Forbidden("you may not download this study, so a link to it cannot allow "
                        "downloads: make it without")
    folder_id = _link_folder(archive, principal, study, folder) if folder else None
    if access is Access.COLLABORATORS and folder_id is None:
        raise BadRequest("a link for the collaborators of a folder is made from that folder")
    lifetime = expires or DEFAULT_LIFETIME
    if lifetime > MAX_LIFETIME:
        raise BadRequest("a share link lasts at most 365 days")
    if passcode is not None:
        _check_passcode_rules(passcode)
    token = secrets.token_urlsafe(32)
    now = datetime.now(UTC)
    secret = secrets.token_hex(32) if deidentify else None
    # Read first, then a transaction that starts by writing: SQLite cannot turn
    # a reading transaction into a writing one once another process has written.
    with archive.db.read() as conn:
        if browse_index.study(conn, study) is None:
            raise NotFound(f"study {study} not found")
        members = index.study_members(conn, study) if deidentify else []
    with archive.db.write() as conn:
        row = index.add_link(conn, {
            "public_id": secrets.token_hex(6),
            "token_hash": _digest(token),
            "study_instance_uid": study,
            "creator": principal.user,
            "created_at": now,
            "expires_at": now + lifetime,
            "passcode_hash": _hasher.hash(passcode) if passcode is not None else None,
            "allow_download": allow_download,
            "deidentify": deidentify,
            "access": access.value,
            "uid_secret": secret,
            "revoked_at": None,
            "folder_id": folder_id,
            "organisation_id": principal.organisation_id or folder_index.DEFAULT_ORGANISATION,
        })
        link = _from_row(row)
        if deidentify:
            index.replace_uid_map(conn, link.row_id, _uid_map_rows(link, members))
    return NewShare(link, token)


def _link_folder(archive: Archive, principal: Principal, study: str, folder: str) -> int:
    """The folder a link is made from: the study in it, the creator a collaborator."""
    with archive.db.read() as conn:
        found = folder_index.folder_by_public_id(conn, folder[:16])
        role = None if found is None or principal.user_id is None else (
            folder_index.role_of(conn, found.id, principal.user_id))
        holding = {f.id for f in folder_index.folders_holding(conn, study)}
    if found is None or (role is None and not principal.is_admin):
        raise NotFound(f"no folder {folder[:16]!r}")
    if found.id not in holding:
        raise BadRequest("the study is not in this folder")
    return found.id


def resolve(archive: Archive, token: str) -> ShareLink:
    """The live link a token names; one NotFound for unknown, expired and revoked."""
    if not token or len(token) > 128:
        raise NotFound(_GONE)
    with archive.db.read() as conn:
        row = index.link_by_token_hash(conn, _digest(token))
    if row is None:
        raise NotFound(_GONE)
    link = _from_row(row)
    if link.state() != "active":
        raise NotFound(_GONE)
    return link


def get_share(archive: Archive, principal: Principal, share_id: str) -> ShareLink:
    """A link by public id, for its creator or an administrator."""
    with archive.db.read() as conn:
        row = index.link_by_public_id(conn, share_id[:16])
    if row is None or not _may_manage(principal, row.creator):
        raise NotFound(f"no share link {share_id[:16]!r}")
    return _from_row(row)


def _may_manage(principal: Principal, creator: str) -> bool:
    if principal.studies is not None:
        return False
    return (principal.is_admin and not principal.read_only) or principal.user == creator


def revoke(archive: Archive, principal: Principal, share_id: str) -> ShareLink:
    """Revoke a link (its creator or an administrator); revoking twice is harmless."""
    link = get_share(archive, principal, share_id)
    principal.require_write()
    with archive.db.write() as conn:
        index.revoke_link(conn, link.row_id, datetime.now(UTC))
        row = index.link_by_public_id(conn, link.id)
    assert row is not None
    return _from_row(row)


def list_shares(
    archive: Archive, principal: Principal, study: str | None = None
) -> list[ShareLink]:
    """Links the caller manages: all of them for administrators, else their own."""
    if principal.studies is not None:
        return []
    creator = None if principal.is_admin else principal.user
    with archive.db.read() as conn:
        rows = index.list_links(conn, study_instance_uid=study, creator=creator)
    return [_from_row(r) for r in rows]


# -- who may use a link ---------------------------------------------------------------


def unlock(archive: Archive, link: ShareLink, passcode: str) -> tuple[str, datetime]:
    """Exchange the passcode for an unlock token and its expiry.

    Every attempt is counted before the passcode is checked, so parallel
    guesses cannot slip past the limit; a right passcode clears the count.
    Raises Unauthenticated for a wrong passcode, Forbidden while locked.
    """
    if not link.has_passcode:
        raise BadRequest("this link has no passcode")
    now = datetime.now(UTC)
    with archive.db.write() as conn:
        state = index.failures_for_update(conn, link.row_id)
        if state.locked_until is not None and state.locked_until > now:
            raise Forbidden("too many wrong passcodes: try again later")
        if state.window_start is None or now - state.window_start > FAILURE_WINDOW:
            state = index.FailureState(0, now, None)
        failures = state.failures + 1
        assert state.window_start is not None
        locked = state.window_start + FAILURE_WINDOW if failures >= MAX_FAILURES else None
        index.save_failures(conn, link.row_id,
                            index.FailureState(failures, state.window_start, locked))
        passcode_hash = _passcode_hash(conn, link)
    if not verify_password(passcode_hash, passcode[:MAX_PASSCODE]):
        raise Unauthenticated("wrong passcode")
    token = UNLOCK_PREFIX + secrets.token_urlsafe(32)
    expires_at = min(now + UNLOCK_LIFETIME, link.expires_at)
    with archive.db.write() as conn:
        index.save_failures(conn, link.row_id, index.FailureState(0, None, None))
        index.add_unlock(conn, link.row_id, _digest(token), expires_at)
    return token, expires_at


def _passcode_hash(conn: Connection, link: ShareLink) -> str | None:
    row = index.link_by_public_id(conn, link.id)
    return row.passcode_hash if row is not None else None


def is_unlocked(archive: Archive, link: ShareLink, unlock_token: str | None) -> bool:
    """Whether ``unlock_token`` opens ``link`` now (links without passcode: always)."""
    if not link.has_passcode:
        return True
    if not unlock_token or len(unlock_token) > 128:
        return False
    with archive.db.read() as conn:
        expires = index.unlock_expiry(conn, link.row_id, _digest(unlock_token))
    return expires is not None and expires > datetime.now(UTC)


def holder(archive: Archive, link: ShareLink, viewer: Principal | None) -> Principal:
    """The Principal of a link's holder: this study only, read-only.

    ``viewer`` is the signed-in caller, required for organisation and
    collaborators links: they must belong to the link's organisation, or be
    a collaborator of its folder.
    """
    if link.access.needs_sign_in:
        if viewer is None or viewer.user_id is None:
            raise Unauthenticated("sign in to open this link")
        _require_audience(archive, link, viewer)
    name = viewer.user if viewer is not None else f"link:{link.id}"
    return Principal(user=name, is_admin=False, studies=frozenset({link.study_instance_uid}),
                     read_only=True, download=link.allow_download)


def _require_audience(archive: Archive, link: ShareLink, viewer: Principal) -> None:
    if link.access is Access.ORGANISATION:
        if viewer.organisation_id != (link.organisation_id or folder_index.DEFAULT_ORGANISATION):
            raise Forbidden("this link is for the members of another organisation")
        return
    role = None
    if link.folder_id is not None and viewer.user_id is not None:
        with archive.db.read() as conn:
            role = folder_index.role_of(conn, link.folder_id, viewer.user_id)
    if role is None:
        raise Forbidden("this link is for the collaborators of a folder you are not in")


# -- de-identified links: public UIDs --------------------------------------------------


def _uid_map_rows(link: ShareLink, members: list[index.Member]) -> list[dict[str, object]]:
    mapper = link.mapper
    assert mapper is not None
    study = link.study_instance_uid
    rows = {mapper.public(study): (study, "study", False)}
    for member in members:
        series = member.series_instance_uid
        rows[mapper.public(series)] = (series, "series", False)
        rows[mapper.public(member.sop_instance_uid)] = (
            member.sop_instance_uid, "instance", member.burned_in)
    return [{"public_uid": p, "original_uid": o, "level": lv, "withheld": w}
            for p, (o, lv, w) in rows.items()]


def refresh_uid_map(archive: Archive, link: ShareLink) -> None:
    """Bring the map up to date when instances were added since (a cheap count check)."""
    with archive.db.read() as conn:
        current = index.instance_count(conn, link.study_instance_uid) == (
            index.mapped_instance_count(conn, link.row_id))
        members = [] if current else index.study_members(conn, link.study_instance_uid)
    if not current:
        with archive.db.write() as conn:
            index.replace_uid_map(conn, link.row_id, _uid_map_rows(link, members))


def original_uid(archive: Archive, link: ShareLink, public_uid: str, level: str) -> str:
    """The original UID behind a public one; NotFound when unknown or withheld."""
    if not link.deidentify:
        return public_uid
    for attempt in range(2):
        with archive.db.read() as conn:
            found = index.original_uid(conn, link.row_id, public_uid[:64])
        if found is not None:
            break
        if attempt == 0:
            refresh_uid_map(archive, link)
    if found is None or found[1] != level or found[2]:
        raise NotFound(f"{level} {public_uid[:64]} not found")
    return found[0]


def withheld(archive: Archive, link: ShareLink) -> set[str]:
    """Original SOP Instance UIDs never shown through ``link`` (burned-in text)."""
    if not link.deidentify:
        return set()
    refresh_uid_map(archive, link)
    with archive.db.read() as conn:
        return index.withheld_uids(conn, link.row_id)


# -- the audit trail and the command line ---------------------------------------------


def record(
    archive: Archive,
    action: str,
    link: ShareLink,
    actor: str,
    *,
    outcome: str = "success",
    caller: Caller | None = None,
    detail: dict[str, object] | None = None,
) -> None:
    """An event about ``link`` in the audit trail, written before returning."""
    caller = caller or Caller()
    archive.audit.record(
        Event(action, actor, outcome, study_uid=link.study_instance_uid, source=caller.source,
              user_agent=caller.user_agent, link=link.id, detail=detail or {}),
        now=True,
    )


def acting_as(archive: Archive, user: str | None) -> Principal:
    """The Principal of a named user (default: the first administrator, made
    if there is none), for the command line, which speaks for the operator."""
    with archive.db.write() as conn:
        found = accounts.get_user(conn, user) if user else accounts.first_admin(conn)
        if found is None:  # as ``lightbox token create`` does on a new archive
            found = accounts.add_user(conn, "admin", None, is_admin=True)
    if found.disabled:
        raise Forbidden(f"user {found.name!r} is disabled")
    return principal_of(archive, found)
