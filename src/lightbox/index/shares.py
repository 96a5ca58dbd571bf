"""Share links in the index: the links, their unlock tokens, passcode failure
counters, and the public-to-original UID maps of de-identified links.

Link tokens and unlock tokens are never stored, only their SHA-256.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    delete,
    func,
    select,
    update,
)

from lightbox.index.schema import as_utc, instances, metadata, series, studies

share_links = Table(
    "share_links",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("public_id", String(16), nullable=False, unique=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("study_instance_uid", String(64), nullable=False),
    Column("creator", String(128), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("passcode_hash", String(256), nullable=True),
    Column("allow_download", Boolean, nullable=False),
    Column("deidentify", Boolean, nullable=False),
    Column("access", String(16), nullable=False),
    Column("uid_secret", String(64), nullable=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Column("failures", Integer, nullable=False, default=0),
    Column("failure_window_start", DateTime(timezone=True), nullable=True),
    Column("locked_until", DateTime(timezone=True), nullable=True),
    Column("folder_id", Integer, nullable=True),
    Column("organisation_id", Integer, nullable=True),
    Index("ix_share_links_study", "study_instance_uid"),
    Index("ix_share_links_creator", "creator"),
)

share_unlocks = Table(
    "share_unlocks",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("link_id", Integer, ForeignKey("share_links.id", ondelete="CASCADE"), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Index("ix_share_unlocks_link", "link_id"),
)

share_uids = Table(
    "share_uids",
    metadata,
    Column("link_id", Integer, ForeignKey("share_links.id", ondelete="CASCADE"),
           primary_key=True),
    Column("public_uid", String(64), primary_key=True),
    Column("original_uid", String(64), nullable=False),
    Column("level", String(8), nullable=False),
    Column("withheld", Boolean, nullable=False),
)


@dataclass(frozen=True)
class LinkRow:
    """A share link as stored (without its token, which is never kept)."""

    id: int
    public_id: str
    study_instance_uid: str
    creator: str
    created_at: datetime
    expires_at: datetime
    passcode_hash: str | None
    allow_download: bool
    deidentify: bool
    access: str
    uid_secret: str | None
    revoked_at: datetime | None
    folder_id: int | None = None
    organisation_id: int | None = None


@dataclass(frozen=True)
class FailureState:
    """Wrong passcodes counted in the current window, and the lock they caused."""

    failures: int
    window_start: datetime | None
    locked_until: datetime | None


def _link(row: Any) -> LinkRow:
    return LinkRow(
        id=row.id, public_id=row.public_id, study_instance_uid=row.study_instance_uid,
        creator=row.creator, created_at=as_utc(row.created_at),
        expires_at=as_utc(row.expires_at), passcode_hash=row.passcode_hash,
        allow_download=bool(row.allow_download), deidentify=bool(row.deidentify),
        access=row.access, uid_secret=row.uid_secret, revoked_at=as_utc(row.revoked_at),
        folder_id=row.folder_id, organisation_id=row.organisation_id,
    )


def add_link(conn: Connection, values: dict[str, Any]) -> LinkRow:
    """Insert a link (``values`` names the columns) and read it back."""
    conn.execute(share_links.insert().values(failures=0, **values))
    found = link_by_public_id(conn, values["public_id"])
    assert found is not None
    return found


def link_by_token_hash(conn: Connection, token_hash: str) -> LinkRow | None:
    row = conn.execute(select(share_links).where(share_links.c.token_hash == token_hash)).first()
    return _link(row) if row is not None else None


def link_by_public_id(conn: Connection, public_id: str) -> LinkRow | None:
    row = conn.execute(select(share_links).where(share_links.c.public_id == public_id)).first()
    return _link(row) if row is not None else None


def list_links(
    conn: Connection, *, study_instance_uid: str | None = None, creator: str | None = None
) -> list[LinkRow]:
    """Links, newest first, optionally of one study and/or one creator."""
    query = select(share_links).order_by(share_links.c.created_at.desc(), share_links.c.id.desc())
    if study_instance_uid is not None:
        query = query.where(share_links.c.study_instance_uid == study_instance_uid)
    if creator is not None:
        query = query.where(share_links.c.creator == creator)
    return [_link(r) for r in conn.execute(query)]


def revoke_link(conn: Connection, link_id: int, at: datetime) -> None:
    conn.execute(
        update(share_links)
        .where(share_links.c.id == link_id, share_links.c.revoked_at.is_(None))
        .values(revoked_at=at)
    )
    conn.execute(delete(share_unlocks).where(share_unlocks.c.link_id == link_id))


def failures_for_update(conn: Connection, link_id: int) -> FailureState:
    """The link's failure counters, locked until the transaction ends.

    A no-op write comes first: on SQLite it takes the write lock at once
    (waiting for other processes), which a read would not.
    """
    conn.execute(update(share_links).where(share_links.c.id == link_id)
                 .values(failures=share_links.c.failures))
    row = conn.execute(
        select(share_links.c.failures, share_links.c.failure_window_start,
               share_links.c.locked_until)
        .where(share_links.c.id == link_id).with_for_update()
    ).one()
    return FailureState(int(row.failures), as_utc(row.failure_window_start),
                        as_utc(row.locked_until))


def save_failures(conn: Connection, link_id: int, state: FailureState) -> None:
    conn.execute(
        update(share_links).where(share_links.c.id == link_id).values(
            failures=state.failures, failure_window_start=state.window_start,
            locked_until=state.locked_until,
        )
    )


def add_unlock(conn: Connection, link_id: int, token_hash: str, expires_at: datetime) -> None:
    # Expired unlock tokens of this link are swept on the way.
    conn.execute(delete(share_unlocks).where(
        share_unlocks.c.link_id == link_id, share_unlocks.c.expires_at < datetime.now(UTC)))
    conn.execute(share_unlocks.insert().values(
        token_hash=token_hash, link_id=link_id, expires_at=expires_at))


def unlock_expiry(conn: Connection, link_id: int, token_hash: str) -> datetime | None:
    """When the unlock token expires, None when it does not belong to the link."""
    found = conn.execute(
        select(share_unlocks.c.expires_at).where(
            share_unlocks.c.token_hash == token_hash, share_unlocks.c.link_id == link_id)
    ).scalar()
    return as_utc(found)


# -- de-identified links: public UIDs ---------------------------------------------------


@dataclass(frozen=True)
class Member:
    """An instance of a study, with whether its pixels carry burned-in text."""

    series_instance_uid: str
    sop_instance_uid: str
    burned_in: bool


def _burned_in(raw: bytes) -> bool:
    if b'"00280301"' not in raw:
        return False
    value = json.loads(raw).get("00280301", {}).get("Value") or [""]
    return str(value[0]).strip().upper() == "YES"


def study_members(conn: Connection, study_instance_uid: str) -> list[Member]:
    """Every instance of the study (reads each instance's cached JSON)."""
    rows = conn.execute(
        select(series.c.series_instance_uid, instances.c.sop_instance_uid,
               instances.c.dicom_json)
        .select_from(instances)
        .join(series, series.c.pk == instances.c.series_pk)
        .join(studies, studies.c.pk == instances.c.study_pk)
        .where(studies.c.study_instance_uid == study_instance_uid)
    )
    return [Member(r.series_instance_uid, r.sop_instance_uid, _burned_in(bytes(r.dicom_json)))
            for r in rows]


def instance_count(conn: Connection, study_instance_uid: str) -> int:
    return int(conn.execute(
        select(studies.c.number_of_instances)
        .where(studies.c.study_instance_uid == study_instance_uid)
    ).scalar() or 0)


def mapped_instance_count(conn: Connection, link_id: int) -> int:
    return int(conn.execute(
        select(func.count()).select_from(share_uids)
        .where(share_uids.c.link_id == link_id, share_uids.c.level == "instance")
    ).scalar_one())


def replace_uid_map(conn: Connection, link_id: int, rows: list[dict[str, object]]) -> None:
    """Replace the link's map with ``rows`` (public_uid, original_uid, level, withheld)."""
    conn.execute(delete(share_uids).where(share_uids.c.link_id == link_id))
    if rows:
        conn.execute(share_uids.insert(), [{"link_id": link_id, **r} for r in rows])


def original_uid(conn: Connection, link_id: int, public_uid: str) -> tuple[str, str, bool] | None:
    """(original UID, level, withheld) of a public UID of the link."""
    row = conn.execute(
        select(share_uids.c.original_uid, share_uids.c.level, share_uids.c.withheld)
        .where(share_uids.c.link_id == link_id, share_uids.c.public_uid == public_uid)
    ).first()
    return (row.original_uid, row.level, bool(row.withheld)) if row is not None else None


def withheld_uids(conn: Connection, link_id: int) -> set[str]:
    """Original SOP Instance UIDs the link never shows."""
    return set(conn.execute(
        select(share_uids.c.original_uid)
        .where(share_uids.c.link_id == link_id, share_uids.c.withheld.is_(True))
    ).scalars())


def withheld_by_series(conn: Connection, link_id: int) -> dict[str, int]:
    """How many withheld instances each series (original UID) has."""
    rows = conn.execute(
        select(series.c.series_instance_uid, func.count())
        .select_from(share_uids)
        .join(instances, instances.c.sop_instance_uid == share_uids.c.original_uid)
        .join(series, series.c.pk == instances.c.series_pk)
        .where(share_uids.c.link_id == link_id, share_uids.c.withheld.is_(True))
        .group_by(series.c.series_instance_uid)
    )
    return {uid: int(n) for uid, n in rows}
