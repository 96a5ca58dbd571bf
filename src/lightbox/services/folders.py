"""Folders: where studies live for members, and who collaborates on them.

Every user has an inbox (made on first use) where their uploads land. A
folder has collaborators, each with a role:

- viewer: sees the folder's studies (downloads them if the folder allows);
- uploader: also adds studies (ones they may pass on, or new uploads);
- editor: also moves studies out, removes them, and comments;
- owner: also manages collaborators and switches, renames and deletes.

A study may be in several folders; a member sees it through any of them.
Administrators may manage every folder. Each change clears the grant cache
(services.access) and lands in the audit trail.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from lightbox.archive import Archive
from lightbox.dicom import uids
from lightbox.errors import BadRequest, Conflict, Forbidden, NotFound
from lightbox.index import folders as index
from lightbox.index.folders import Comment, FolderEntry, FolderRow, Member
from lightbox.services import access
from lightbox.services.audit import Caller, Event
from lightbox.services.auth import Principal
from lightbox.services.ingest import FailureReason, Outcome, Prepared, Status, discard

INBOX_NAME = "Inbox"
MAX_NAME = 128
MAX_COMMENT = 4000


class Role(enum.StrEnum):
    VIEWER = "viewer"
    UPLOADER = "uploader"
    EDITOR = "editor"
    OWNER = "owner"

    @property
    def rank(self) -> int:
        return list(Role).index(self)

    def at_least(self, other: Role) -> bool:
        return self.rank >= other.rank


def parse_role(text: str) -> Role:
    try:
        return Role(text.strip().lower())
    except ValueError as exc:
        raise BadRequest("a role is viewer, uploader, editor or owner") from exc


@dataclass(frozen=True)
class FolderView:
    """A folder as its page shows it; ``role`` is None for an administrator
    looking at a folder they are not in."""

    folder: FolderRow
    role: Role | None
    members: list[Member]
    comments: list[Comment]

    @property
    def is_inbox(self) -> bool:
        return self.folder.inbox_of is not None

    def may(self, needed: Role, is_admin: bool = False) -> bool:
        return is_admin or (self.role is not None and self.role.at_least(needed))


def _require_member(principal: Principal) -> int:
    """The caller's user id; tokens limited to some studies cannot act on folders."""
    if principal.user_id is None or principal.studies is not None:
        raise Forbidden("folders belong to signed-in users")
    return principal.user_id


def _require_name(name: str) -> str:
    name = " ".join(name.split())
    if not name or len(name) > MAX_NAME or not name.isprintable():
        raise BadRequest(f"a folder name needs 1 to {MAX_NAME} printable characters")
    return name


def _record(archive: Archive, action: str, principal: Principal, caller: Caller | None,
            study: str | None = None, **detail: object) -> None:
    caller = caller or Caller()
    archive.audit.record(
        Event(action, principal.user, study_uid=study, source=caller.source,
              user_agent=caller.user_agent, detail=dict(detail)),
        now=True,
    )


def _changed() -> None:
    access.invalidate()


# -- reading --------------------------------------------------------------------------


def ensure_inbox(archive: Archive, principal: Principal) -> FolderRow:
    """The caller's inbox, made on first use."""
    user_id = _require_member(principal)
    with archive.db.read() as conn:
        found = index.inbox_of(conn, user_id)
    if found is not None:
        return found
    try:
        with archive.db.write() as conn:
            found = index.inbox_of(conn, user_id)  # made meanwhile by another request
            if found is None:
                found = index.add_folder(
                    conn, public_id=secrets.token_hex(6), name=INBOX_NAME,
                    organisation=principal.organisation_id or index.DEFAULT_ORGANISATION,
                    inbox_of=user_id, allow_download=True, allow_reshare=True)
                index.set_member(conn, found.id, user_id, Role.OWNER.value)
    except IntegrityError:
        # Made by a parallel request in the same moment (PostgreSQL lets both try):
        # theirs is the inbox.
        with archive.db.read() as conn:
            found = index.inbox_of(conn, user_id)
        if found is None:
            raise
    _changed()
    return found


def list_folders(archive: Archive, principal: Principal) -> list[FolderEntry]:
    """The caller's folders, inbox first."""
    ensure_inbox(archive, principal)
    with archive.db.read() as conn:
        return index.folders_of(conn, principal.user_id)


def _load(conn: Connection, principal: Principal, public_id: str) -> tuple[FolderRow, Role | None]:
    """A folder and the caller's role in it; NotFound unless a member or an administrator."""
    found = index.folder_by_public_id(conn, public_id[:16])
    role = None
    if found is not None and principal.user_id is not None and principal.studies is None:
        held = index.role_of(conn, found.id, principal.user_id)
        role = Role(held) if held is not None else None
    if found is None or (role is None and not (principal.is_admin and principal.whole_archive)):
        raise NotFound(f"no folder {public_id[:16]!r}")
    return found, role


def _require_role(principal: Principal, role: Role | None, needed: Role) -> None:
    if principal.is_admin and not principal.read_only:
        return
    if role is None or not role.at_least(needed) or principal.read_only:
        raise Forbidden(f"this needs the {needed.value} role in the folder")


def open_folder(archive: Archive, principal: Principal, public_id: str) -> FolderView:
    with archive.db.read() as conn:
        found, role = _load(conn, principal, public_id)
        return FolderView(found, role, index.members(conn, found.id),
                          index.comments(conn, found.id))


def folders_of_study(archive: Archive, principal: Principal, study: str) -> list[index.Grant]:
    """The caller's folders that hold ``study`` (for the study page)."""
    if principal.user_id is None:
        return []
    with archive.db.read() as conn:
        return index.grants_on_study(conn, principal.user_id, study)


def managed_folder(archive: Archive, principal: Principal, public_id: str) -> FolderView:
    """A folder the caller may manage (owner, or an administrator); Forbidden otherwise."""
    view = open_folder(archive, principal, public_id)
    _require_role(principal, view.role, Role.OWNER)
    return view


def study_folders(archive: Archive, principal: Principal,
                  study: str) -> tuple[list[FolderRow], list[FolderRow]]:
    """For the study page: the caller's folders holding ``study`` (every folder
    holding it, for an administrator), and those they could add it to."""
    if principal.user_id is None or principal.studies is not None:
        return [], []
    entries = list_folders(archive, principal)
    with archive.db.read() as conn:
        holding_ids = {f.id for f in index.folders_holding(conn, study)}
    holding = [e.folder for e in entries if e.folder.id in holding_ids]
    targets = [e.folder for e in entries if e.folder.id not in holding_ids
               and e.role is not None and Role(e.role).at_least(Role.UPLOADER)]
    return holding, targets


# -- studies in folders ---------------------------------------------------------------


def _study_pks(conn: Connection, study_uids: Iterable[str]) -> dict[str, int]:
    wanted = [uids.require_uid(u, "StudyInstanceUID") for u in study_uids]
    found = index.study_pks(conn, wanted)
    missing = [u for u in wanted if u not in found]
    if missing:
        raise NotFound(f"study {missing[0]} not found")
    return found


def add_studies(archive: Archive, principal: Principal, public_id: str, study_uids: list[str],
                caller: Caller | None = None) -> int:
    """File studies the caller may pass on into a folder (uploader or above)."""
    for study in study_uids:
        access.require_reshare(principal, study)
    with archive.db.write() as conn:
        found, role = _load(conn, principal, public_id)
        _require_role(principal, role, Role.UPLOADER)
        added = index.add_studies(conn, found.id, _study_pks(conn, study_uids).values(),
                                  principal.user)
    _changed()
    for study in study_uids:
        _record(archive, "folder_add_study", principal, caller, study, folder=found.public_id)
    return added


def file_uploads(archive: Archive, principal: Principal, study_uids: Iterable[str],
                 folder: str | None = None, offered: Iterable[str] = ()) -> None:
    """After an upload: a member's studies that are new to them go to their
    inbox (or ``folder``, where they need the uploader role). The claims made
    by ``screen_uploads`` for every ``offered`` study end here.

    Callers that see the whole archive (administrators, nodes) need no inbox
    for what they upload: they see it anyway.
    """
    if principal.grants is None or principal.studies is not None or principal.user_id is None:
        return
    stored = set(study_uids)
    wanted = sorted(u for u in stored if folder or not principal.may_read(u))
    target = (folder or ensure_inbox(archive, principal).public_id) if wanted else None
    with archive.db.write() as conn:
        if target is not None:
            found, role = _load(conn, principal, target)
            _require_role(principal, role, Role.UPLOADER)
            index.add_studies(conn, found.id, index.study_pks(conn, wanted).values(),
                              principal.user)
        index.drop_claims(conn, principal.user_id, stored | set(offered))
    _changed()


def screen_uploads(archive: Archive, principal: Principal,
                   prepared: list[Prepared]) -> list[Prepared]:
    """Refuse a member's instances of existing studies they may not add to.

    Otherwise an upload would file someone else's study into the uploader's
    inbox (and "duplicate" answers would tell them what exists), or a viewer
    would change a study they were only shown.
    """
    if principal.grants is None or principal.user_id is None:
        return prepared
    offered = {p.record.study_instance_uid for p in prepared if p.record is not None}
    with archive.db.write() as conn:
        # New studies are claimed at once: the member's parallel uploads of the
        # same new study (the upload page sends several) are theirs too.
        claimed = index.claim_studies(conn, principal.user_id, offered)
        existing = index.study_pks(conn, offered)
    hidden = {uid for uid in existing
              if uid not in claimed and not access.may_add_to(principal, uid)}
    if not hidden:
        return prepared
    screened = []
    for item in prepared:
        record = item.record
        if record is None or record.study_instance_uid not in hidden:
            screened.append(item)
            continue
        discard([item])
        refused = Outcome(
            Status.REJECTED, item.offer.source, record.sop_instance_uid, record.sop_class_uid,
            record.study_instance_uid, record.series_instance_uid,
            "adding to this study needs the uploader role in a folder holding it",
            FailureReason.NOT_AUTHORIZED)
        screened.append(Prepared(item.offer, None, refused))
    return screened


def remove_study(archive: Archive, principal: Principal, public_id: str, study: str,
                 caller: Caller | None = None) -> None:
    """Take a study out of a folder (editor or above); it stays in the archive."""
    with archive.db.write() as conn:
        found, role = _load(conn, principal, public_id)
        _require_role(principal, role, Role.EDITOR)
        pk = _study_pks(conn, [study])[study]
        index.remove_study(conn, found.id, pk)
    _changed()
    _record(archive, "folder_remove_study", principal, caller, study, folder=found.public_id)


def move_study(archive: Archive, principal: Principal, source: str, target: str, study: str,
               caller: Caller | None = None) -> None:
    """Move a study between folders: editor of the source, uploader of the
    target, and allowed to pass the study on (as for adding it anywhere)."""
    access.require_reshare(principal, study)
    with archive.db.write() as conn:
        origin, from_role = _load(conn, principal, source)
        _require_role(principal, from_role, Role.EDITOR)
        destination, to_role = _load(conn, principal, target)
        _require_role(principal, to_role, Role.UPLOADER)
        pk = _study_pks(conn, [study])[study]
        index.remove_study(conn, origin.id, pk)
        index.add_studies(conn, destination.id, [pk], principal.user)
    _changed()
    _record(archive, "folder_move_study", principal, caller, study, folder=origin.public_id,
            to=destination.public_id)


def comment(archive: Archive, principal: Principal, public_id: str, text: str,
            study: str | None = None) -> None:
    """A comment on the folder or one of its studies (editor or above)."""
    text = text.strip()
    if not text or len(text) > MAX_COMMENT:
        raise BadRequest(f"a comment needs 1 to {MAX_COMMENT} characters")
    with archive.db.write() as conn:
        found, role = _load(conn, principal, public_id)
        _require_role(principal, role, Role.EDITOR)
        if study is not None:
            pk = _study_pks(conn, [study])[study]
            if pk not in {p for p in conn.execute(index.folder_study_pks(found.id)).scalars()}:
                raise NotFound("the study is not in this folder")
        index.add_comment(conn, found.id, principal.user, text, study)


# -- the folder itself ----------------------------------------------------------------


def create_folder(archive: Archive, principal: Principal, name: str,
                  caller: Caller | None = None) -> FolderRow:
    """A new folder owned by the caller."""
    user_id = _require_member(principal)
    principal.require_write()
    name = _require_name(name)
    with archive.db.write() as conn:
        found = index.add_folder(
            conn, public_id=secrets.token_hex(6), name=name,
            organisation=principal.organisation_id or index.DEFAULT_ORGANISATION)
        index.set_member(conn, found.id, user_id, Role.OWNER.value)
    _changed()
    _record(archive, "folder_create", principal, caller, folder=found.public_id, name=name)
    return found


def update_folder(archive: Archive, principal: Principal, public_id: str, *,
                  name: str | None = None, allow_download: bool | None = None,
                  allow_reshare: bool | None = None, caller: Caller | None = None) -> FolderRow:
    """Rename or flip the switches (owner)."""
    with archive.db.write() as conn:
        found, role = _load(conn, principal, public_id)
        _require_role(principal, role, Role.OWNER)
        if name is not None:
            if found.inbox_of is not None:
                raise BadRequest("an inbox keeps its name")
            index.rename_folder(conn, found.id, _require_name(name))
        index.set_switches(
            conn, found.id,
            allow_download=found.allow_download if allow_download is None else allow_download,
            allow_reshare=found.allow_reshare if allow_reshare is None else allow_reshare)
        changed = index.folder_by_id(conn, found.id)
    assert changed is not None
    _changed()
    _record(archive, "folder_settings", principal, caller, folder=found.public_id,
            name=changed.name, download=changed.allow_download, reshare=changed.allow_reshare)
    return changed


def delete_folder(archive: Archive, principal: Principal, public_id: str,
                  caller: Caller | None = None) -> None:
    """Delete a folder (owner); its studies stay in the archive and other folders."""
    with archive.db.write() as conn:
        found, role = _load(conn, principal, public_id)
        _require_role(principal, role, Role.OWNER)
        if found.inbox_of is not None:
            raise BadRequest("an inbox cannot be deleted")
        index.delete_folder(conn, found.id)
    _changed()
    _record(archive, "folder_delete", principal, caller, folder=found.public_id, name=found.name)


# -- collaborators --------------------------------------------------------------------


def set_collaborator(archive: Archive, principal: Principal, public_id: str, user: str,
                     role: Role, caller: Caller | None = None) -> Member:
    """Add a user (by name or e-mail address) to a folder, or change their role (owner)."""
    with archive.db.write() as conn:
        found, own_role = _load(conn, principal, public_id)
        _require_role(principal, own_role, Role.OWNER)
        if found.inbox_of is not None:
            raise BadRequest("an inbox is yours alone: make a folder to collaborate")
        person = find_person(conn, user)
        if person is None:
            raise NotFound(f"no user {user[:128]!r}")
        if person.disabled:
            raise BadRequest(f"user {person.name!r} is disabled")
        current = index.role_of(conn, found.id, person.id)
        if current == Role.OWNER.value and role is not Role.OWNER:
            _keep_an_owner(conn, found.id)
        index.set_member(conn, found.id, person.id, role.value)
        member = next(m for m in index.members(conn, found.id) if m.user_id == person.id)
    _changed()
    _record(archive, "folder_member", principal, caller, folder=found.public_id,
            user=person.name, role=role.value, before=current)
    return member


def remove_collaborator(archive: Archive, principal: Principal, public_id: str, user: str,
                        caller: Caller | None = None) -> None:
    """Take a collaborator out (owner), or leave a folder yourself."""
    with archive.db.write() as conn:
        found, own_role = _load(conn, principal, public_id)
        person = find_person(conn, user)
        if person is None:
            raise NotFound(f"no user {user[:128]!r}")
        if person.id != principal.user_id:
            _require_role(principal, own_role, Role.OWNER)
        if found.inbox_of is not None:
            raise BadRequest("an inbox keeps its owner")
        if index.role_of(conn, found.id, person.id) == Role.OWNER.value:
            _keep_an_owner(conn, found.id)
        index.remove_member(conn, found.id, person.id)
    _changed()
    _record(archive, "folder_member", principal, caller, folder=found.public_id,
            user=person.name, role=None)


def _keep_an_owner(conn: Connection, folder_id: int) -> None:
    if index.count_role(conn, folder_id, Role.OWNER.value) <= 1:
        raise Conflict("a folder needs an owner: make someone else owner first")


def find_person(conn: Connection, who: str) -> index.Person | None:
    """A user by name, else by e-mail address."""
    who = who.strip()[:254]
    if not who:
        return None
    return index.person(conn, name=who) or (
        index.person(conn, email=who) if "@" in who else None)
