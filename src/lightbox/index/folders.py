"""Organisations, folders, their collaborators, studies and comments in the
index (invitations to them: ``index.invitations``).

A folder holds studies (by study row, so deleting a study takes it out of
every folder) and has members with a role. Every user's inbox is a folder
whose ``inbox_of`` names them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    Select,
    String,
    Table,
    Text,
    delete,
    func,
    null,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from lightbox.errors import Conflict, NotFound
from lightbox.index.invitations import invitations
from lightbox.index.schema import as_utc, metadata, studies, users

DEFAULT_ORGANISATION = 1
CLAIM_LIFETIME = timedelta(hours=1)

organisations = Table(
    "organisations",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

folders = Table(
    "folders",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("public_id", String(16), nullable=False, unique=True),
    Column("name", String(128), nullable=False),
    Column("organisation_id", Integer, ForeignKey("organisations.id"), nullable=False),
    Column("inbox_of", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=True,
           unique=True),
    Column("allow_download", Boolean, nullable=False),
    Column("allow_reshare", Boolean, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

folder_members = Table(
    "folder_members",
    metadata,
    Column("folder_id", Integer, ForeignKey("folders.id", ondelete="CASCADE"), primary_key=True),
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("role", String(16), nullable=False),
    Column("added_at", DateTime(timezone=True), nullable=False),
    Index("ix_folder_members_user", "user_id"),
)

folder_studies = Table(
    "folder_studies",
    metadata,
    Column("folder_id", Integer, ForeignKey("folders.id", ondelete="CASCADE"), primary_key=True),
    Column("study_pk", Integer, ForeignKey("studies.pk", ondelete="CASCADE"), primary_key=True),
    Column("added_by", String(128), nullable=False),
    Column("added_at", DateTime(timezone=True), nullable=False),
    Index("ix_folder_studies_study", "study_pk"),
)

folder_comments = Table(
    "folder_comments",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("folder_id", Integer, ForeignKey("folders.id", ondelete="CASCADE"), nullable=False),
    Column("study_instance_uid", String(64), nullable=True),
    Column("author", String(128), nullable=False),
    Column("text", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_folder_comments_folder", "folder_id"),
)

upload_claims = Table(
    "upload_claims",
    metadata,
    Column("study_instance_uid", String(64), primary_key=True),
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)


def _insert_or_nothing(conn: Connection, table: Table) -> Any:
    """An INSERT that skips rows already there (parallel requests filing or
    claiming the same study: PostgreSQL runs them side by side)."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert(table).on_conflict_do_nothing()


# -- organisations --------------------------------------------------------------------


def add_organisation(conn: Connection, name: str) -> int:
    if organisation_id(conn, name) is not None:
        raise Conflict(f"organisation {name!r} already exists")
    result = conn.execute(organisations.insert().values(name=name, created_at=datetime.now(UTC)))
    return int(result.inserted_primary_key[0])  # type: ignore[index]


def organisation_id(conn: Connection, name: str) -> int | None:
    found = conn.execute(
        select(organisations.c.id).where(organisations.c.name == name)
    ).scalar_one_or_none()
    return int(found) if found is not None else None


def organisation_names(conn: Connection) -> dict[int, str]:
    return {r.id: r.name for r in conn.execute(select(organisations).order_by(organisations.c.id))}


def users_of_organisation(conn: Connection, org: int) -> list[str]:
    return list(conn.execute(
        select(users.c.name).where(users.c.organisation_id == org).order_by(users.c.name)
    ).scalars())


@dataclass(frozen=True)
class Person:
    """A user as folders see them."""

    id: int
    name: str
    email: str | None
    organisation_id: int
    disabled: bool


def _person(row: Any) -> Person:
    return Person(row.id, row.name, row.email, int(row.organisation_id), bool(row.disabled))


def person(conn: Connection, *, name: str | None = None, email: str | None = None,
           user_id: int | None = None) -> Person | None:
    """A user by name, by e-mail address (case-insensitive) or by id."""
    query = select(users.c.id, users.c.name, users.c.email, users.c.organisation_id,
                   users.c.disabled)
    if name is not None:
        query = query.where(users.c.name == name)
    elif email is not None:
        query = query.where(func.lower(users.c.email) == email.lower())
    else:
        query = query.where(users.c.id == user_id)
    row = conn.execute(query).first()
    return _person(row) if row is not None else None


def set_profile(conn: Connection, user_id: int, *, email: str | None = None,
                organisation: int | None = None) -> None:
    values: dict[str, object] = {}
    if email is not None:
        taken = person(conn, email=email)
        if taken is not None and taken.id != user_id:
            raise Conflict("this e-mail address belongs to another user")
        values["email"] = email
    if organisation is not None:
        values["organisation_id"] = organisation
    if values:
        conn.execute(update(users).where(users.c.id == user_id).values(**values))


# -- folders --------------------------------------------------------------------------


@dataclass(frozen=True)
class FolderRow:
    id: int
    public_id: str
    name: str
    organisation_id: int
    inbox_of: int | None
    allow_download: bool
    allow_reshare: bool
    created_at: datetime


def _folder(row: Any) -> FolderRow:
    return FolderRow(
        id=row.id, public_id=row.public_id, name=row.name,
        organisation_id=int(row.organisation_id), inbox_of=row.inbox_of,
        allow_download=bool(row.allow_download), allow_reshare=bool(row.allow_reshare),
        created_at=as_utc(row.created_at),
    )


def add_folder(conn: Connection, *, public_id: str, name: str, organisation: int,
               inbox_of: int | None = None, allow_download: bool = True,
               allow_reshare: bool = False) -> FolderRow:
    conn.execute(folders.insert().values(
        public_id=public_id, name=name, organisation_id=organisation, inbox_of=inbox_of,
        allow_download=allow_download, allow_reshare=allow_reshare,
        created_at=datetime.now(UTC),
    ))
    found = folder_by_public_id(conn, public_id)
    assert found is not None
    return found


def folder_by_public_id(conn: Connection, public_id: str) -> FolderRow | None:
    row = conn.execute(select(folders).where(folders.c.public_id == public_id)).first()
    return _folder(row) if row is not None else None


def folder_by_id(conn: Connection, folder_id: int) -> FolderRow | None:
    row = conn.execute(select(folders).where(folders.c.id == folder_id)).first()
    return _folder(row) if row is not None else None


def inbox_of(conn: Connection, user_id: int) -> FolderRow | None:
    row = conn.execute(select(folders).where(folders.c.inbox_of == user_id)).first()
    return _folder(row) if row is not None else None


@dataclass(frozen=True)
class FolderEntry:
    """A folder in a listing: the caller's role (None for an administrator looking
    on) and how many studies and collaborators it has."""

    folder: FolderRow
    role: str | None
    studies: int
    members: int


def _counted(query: Select[Any]) -> Select[Any]:
    study_count = (
        select(func.count()).select_from(folder_studies)
        .where(folder_studies.c.folder_id == folders.c.id).correlate(folders).scalar_subquery()
    )
    member_count = (
        select(func.count()).select_from(folder_members)
        .where(folder_members.c.folder_id == folders.c.id).correlate(folders).scalar_subquery()
    )
    return query.add_columns(study_count.label("n_studies"), member_count.label("n_members"))


def folders_of(conn: Connection, user_id: int | None) -> list[FolderEntry]:
    """The folders ``user_id`` is a member of (None: every folder), inbox first."""
    if user_id is None:
        query = _counted(select(folders).add_columns(null().label("role")))
    else:
        query = _counted(
            select(folders, folder_members.c.role)
            .join(folder_members, folder_members.c.folder_id == folders.c.id)
            .where(folder_members.c.user_id == user_id)
        )
    query = query.order_by(folders.c.inbox_of.is_(None), func.lower(folders.c.name), folders.c.id)
    return [FolderEntry(_folder(r), r.role, int(r.n_studies), int(r.n_members))
            for r in conn.execute(query)]


def set_switches(conn: Connection, folder_id: int, *, allow_download: bool,
                 allow_reshare: bool) -> None:
    conn.execute(update(folders).where(folders.c.id == folder_id).values(
        allow_download=allow_download, allow_reshare=allow_reshare))


def rename_folder(conn: Connection, folder_id: int, name: str) -> None:
    conn.execute(update(folders).where(folders.c.id == folder_id).values(name=name))


def delete_folder(conn: Connection, folder_id: int) -> None:
    # Explicit deletes: PostgreSQL and SQLite both cascade, but say what goes.
    for table in (folder_studies, folder_members, folder_comments):
        conn.execute(delete(table).where(table.c.folder_id == folder_id))
    conn.execute(delete(invitations).where(invitations.c.folder_id == folder_id))
    conn.execute(delete(folders).where(folders.c.id == folder_id))


# -- members --------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    user_id: int
    name: str
    email: str | None
    role: str
    added_at: datetime


def members(conn: Connection, folder_id: int) -> list[Member]:
    rows = conn.execute(
        select(users.c.id, users.c.name, users.c.email, folder_members.c.role,
               folder_members.c.added_at)
        .join(folder_members, folder_members.c.user_id == users.c.id)
        .where(folder_members.c.folder_id == folder_id)
        .order_by(users.c.name)
    )
    return [Member(r.id, r.name, r.email, r.role, as_utc(r.added_at)) for r in rows]


def role_of(conn: Connection, folder_id: int, user_id: int) -> str | None:
    found = conn.execute(
        select(folder_members.c.role).where(
            folder_members.c.folder_id == folder_id, folder_members.c.user_id == user_id)
    ).scalar_one_or_none()
    return str(found) if found is not None else None


def set_member(conn: Connection, folder_id: int, user_id: int, role: str) -> None:
    """Add a member or change their role."""
    done = conn.execute(update(folder_members).where(
        folder_members.c.folder_id == folder_id, folder_members.c.user_id == user_id,
    ).values(role=role))
    if done.rowcount == 0:
        conn.execute(folder_members.insert().values(
            folder_id=folder_id, user_id=user_id, role=role, added_at=datetime.now(UTC)))


def remove_member(conn: Connection, folder_id: int, user_id: int) -> None:
    done = conn.execute(delete(folder_members).where(
        folder_members.c.folder_id == folder_id, folder_members.c.user_id == user_id))
    if done.rowcount == 0:
        raise NotFound("not a collaborator of this folder")


def count_role(conn: Connection, folder_id: int, role: str) -> int:
    return int(conn.execute(
        select(func.count()).select_from(folder_members)
        .where(folder_members.c.folder_id == folder_id, folder_members.c.role == role)
    ).scalar_one())


# -- studies in folders ---------------------------------------------------------------


def study_pks(conn: Connection, study_uids: Iterable[str]) -> dict[str, int]:
    wanted = sorted(set(study_uids))
    if not wanted:
        return {}
    rows = conn.execute(select(studies.c.study_instance_uid, studies.c.pk)
                        .where(studies.c.study_instance_uid.in_(wanted)))
    return {r.study_instance_uid: int(r.pk) for r in rows}


def add_studies(conn: Connection, folder_id: int, pks: Iterable[int], added_by: str) -> int:
    """File studies into a folder; ones already there are left as they are."""
    wanted = set(pks)
    if not wanted:
        return 0
    present = set(conn.execute(select(folder_studies.c.study_pk).where(
        folder_studies.c.folder_id == folder_id, folder_studies.c.study_pk.in_(wanted))).scalars())
    new = sorted(wanted - present)
    if new:
        now = datetime.now(UTC)
        conn.execute(_insert_or_nothing(conn, folder_studies), [
            {"folder_id": folder_id, "study_pk": pk, "added_by": added_by, "added_at": now}
            for pk in new
        ])
    return len(new)


def remove_study(conn: Connection, folder_id: int, study_pk: int) -> None:
    done = conn.execute(delete(folder_studies).where(
        folder_studies.c.folder_id == folder_id, folder_studies.c.study_pk == study_pk))
    if done.rowcount == 0:
        raise NotFound("the study is not in this folder")


def claim_studies(conn: Connection, user_id: int, study_uids: Iterable[str]) -> set[str]:
    """Claim for ``user_id`` the studies of an upload that do not exist yet, and
    return every study of ``study_uids`` they hold a claim on. Claims last an
    hour at most (an upload that broke off leaves its claims behind)."""
    wanted = sorted(set(study_uids))
    if not wanted:
        return set()
    now = datetime.now(UTC)
    conn.execute(delete(upload_claims).where(
        upload_claims.c.created_at < now - CLAIM_LIFETIME))
    existing = set(study_pks(conn, wanted))
    mine = set(conn.execute(select(upload_claims.c.study_instance_uid).where(
        upload_claims.c.user_id == user_id,
        upload_claims.c.study_instance_uid.in_(wanted))).scalars())
    new = [u for u in wanted if u not in existing and u not in mine]
    if new:
        # Two requests of one upload may claim the same study at once: the
        # second insert is a no-op, not an error (PostgreSQL runs them together).
        conn.execute(_insert_or_nothing(conn, upload_claims), [
            {"study_instance_uid": u, "user_id": user_id, "created_at": now} for u in new])
    return mine | set(new)


def drop_claims(conn: Connection, user_id: int, study_uids: Iterable[str]) -> None:
    wanted = sorted(set(study_uids))
    if wanted:
        conn.execute(delete(upload_claims).where(
            upload_claims.c.user_id == user_id,
            upload_claims.c.study_instance_uid.in_(wanted)))


def visible_study_pks(user_id: int) -> Select[Any]:
    """The study rows a member sees: those in any folder they belong to."""
    return (
        select(folder_studies.c.study_pk)
        .join(folder_members, folder_members.c.folder_id == folder_studies.c.folder_id)
        .where(folder_members.c.user_id == user_id)
    )


def folder_study_pks(folder_id: int) -> Select[Any]:
    return select(folder_studies.c.study_pk).where(folder_studies.c.folder_id == folder_id)


@dataclass(frozen=True)
class Grant:
    """One folder through which a user reaches a study, and what it allows them."""

    folder_id: int
    folder_public_id: str
    folder_name: str
    role: str
    is_inbox: bool
    allow_download: bool
    allow_reshare: bool


def grants_on_study(conn: Connection, user_id: int, study_uid: str) -> list[Grant]:
    rows = conn.execute(
        select(folders.c.id, folders.c.public_id, folders.c.name, folders.c.inbox_of,
               folders.c.allow_download, folders.c.allow_reshare, folder_members.c.role)
        .join(folder_members, folder_members.c.folder_id == folders.c.id)
        .join(folder_studies, folder_studies.c.folder_id == folders.c.id)
        .join(studies, studies.c.pk == folder_studies.c.study_pk)
        .where(folder_members.c.user_id == user_id, studies.c.study_instance_uid == study_uid)
        .order_by(folders.c.id)
    )
    return [Grant(r.id, r.public_id, r.name, r.role, r.inbox_of is not None,
                  bool(r.allow_download), bool(r.allow_reshare)) for r in rows]


def folders_holding(conn: Connection, study_uid: str) -> list[FolderRow]:
    rows = conn.execute(
        select(folders)
        .join(folder_studies, folder_studies.c.folder_id == folders.c.id)
        .join(studies, studies.c.pk == folder_studies.c.study_pk)
        .where(studies.c.study_instance_uid == study_uid)
        .order_by(folders.c.id)
    )
    return [_folder(r) for r in rows]


# -- comments -------------------------------------------------------------------------


@dataclass(frozen=True)
class Comment:
    author: str
    text: str
    study_instance_uid: str | None
    created_at: datetime


def add_comment(conn: Connection, folder_id: int, author: str, text: str,
                study_uid: str | None) -> None:
    conn.execute(folder_comments.insert().values(
        folder_id=folder_id, author=author, text=text, study_instance_uid=study_uid,
        created_at=datetime.now(UTC)))


def comments(conn: Connection, folder_id: int, limit: int = 200) -> list[Comment]:
    rows = conn.execute(
        select(folder_comments).where(folder_comments.c.folder_id == folder_id)
        .order_by(folder_comments.c.id.desc()).limit(limit)
    )
    return [Comment(r.author, r.text, r.study_instance_uid, as_utc(r.created_at)) for r in rows]
