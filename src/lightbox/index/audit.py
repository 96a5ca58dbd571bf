"""The audit trail in the index: append-only rows linked by a hash chain.

Each row stores the hash of the row before it and its own hash over its
content. ``audit_head`` holds the sequence number and hash of the newest row;
appending locks it, so writers in several processes extend one chain.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    DateTime,
    Index,
    Integer,
    String,
    Table,
    Text,
    func,
    select,
    update,
)

from lightbox.index.schema import metadata

GENESIS = "0" * 64

audit_events = Table(
    "audit_events",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("actor", String(160), nullable=False),
    Column("action", String(32), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("patient_id", String(64), nullable=True),
    Column("study_uid", String(64), nullable=True),
    Column("series_uid", String(64), nullable=True),
    Column("source", String(64), nullable=True),
    Column("user_agent", String(256), nullable=True),
    Column("link", String(64), nullable=True),
    Column("detail", Text, nullable=True),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Index("ix_audit_study_seq", "study_uid", "seq"),
    Index("ix_audit_link_seq", "link", "seq"),
)

audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", Integer, nullable=False),
    Column("hash", String(64), nullable=False),
)

FIELDS = (
    "seq", "at", "actor", "action", "outcome", "patient_id", "study_uid", "series_uid",
    "source", "user_agent", "link", "detail",
)


def lock_head(conn: Connection) -> tuple[int, str]:
    """The newest row's sequence number and hash, locked until commit."""
    row = conn.execute(
        select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == 1).with_for_update()
    ).first()
    if row is None:
        conn.execute(audit_head.insert().values(id=1, seq=0, hash=GENESIS))
        return 0, GENESIS
    return int(row.seq), str(row.hash)


def append(conn: Connection, rows: list[dict[str, Any]], head: tuple[int, str]) -> None:
    """Insert chained rows (their seq/prev_hash/hash already set) and move the head."""
    if not rows:
        return
    conn.execute(audit_events.insert(), rows)
    last = rows[-1]
    conn.execute(
        update(audit_head).where(audit_head.c.id == 1).values(seq=last["seq"], hash=last["hash"])
    )


def head(conn: Connection) -> tuple[int, str]:
    row = conn.execute(select(audit_head.c.seq, audit_head.c.hash)).first()
    return (int(row.seq), str(row.hash)) if row is not None else (0, GENESIS)


def rows(conn: Connection, *, batch: int = 2000) -> Iterator[dict[str, Any]]:
    """Every row in chain order, read in batches."""
    after = 0
    while True:
        found = conn.execute(
            select(audit_events).where(audit_events.c.seq > after)
            .order_by(audit_events.c.seq).limit(batch)
        ).mappings().all()
        if not found:
            return
        for row in found:
            yield dict(row)
        after = int(found[-1]["seq"])


def newest(conn: Connection, *, limit: int, study_uid: str | None = None,
           link: str | None = None) -> list[dict[str, Any]]:
    """The newest rows about one study or one share link."""
    column, value = ((audit_events.c.study_uid, study_uid) if link is None
                     else (audit_events.c.link, link))
    return [
        dict(r)
        for r in conn.execute(
            select(audit_events).where(column == value)
            .order_by(audit_events.c.seq.desc()).limit(limit)
        ).mappings()
    ]


def _matching(query: Any, *, action: str | None = None, actor: str | None = None,
              actor_prefix: bool = False, study_uid: str | None = None,
              since: datetime | None = None, until: datetime | None = None) -> Any:
    """``query`` narrowed by the audit page's filters (all optional, ANDed)."""
    c = audit_events.c
    if action is not None:
        query = query.where(c.action == action)
    if actor is not None:
        if actor_prefix:
            escaped = actor.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            query = query.where(c.actor.like(escaped + "%", escape="\\"))
        else:
            query = query.where(c.actor == actor)
    if study_uid is not None:
        query = query.where(c.study_uid == study_uid)
    if since is not None:
        query = query.where(c.at >= since)
    if until is not None:
        query = query.where(c.at < until)
    return query


def search(conn: Connection, *, limit: int, before: int | None = None,
           after: int | None = None, **filters: Any) -> list[dict[str, Any]]:
    """Up to ``limit`` matching rows, newest first: those just below ``before``, or
    those just above ``after`` (keyset paging: rows written meanwhile shift nothing)."""
    c = audit_events.c
    query = _matching(select(audit_events), **filters)
    if after is not None:
        found = conn.execute(query.where(c.seq > after).order_by(c.seq).limit(limit))
        return [dict(r) for r in reversed(found.mappings().all())]
    if before is not None:
        query = query.where(c.seq < before)
    return [dict(r) for r in conn.execute(query.order_by(c.seq.desc()).limit(limit)).mappings()]


def count(conn: Connection, **filters: Any) -> int:
    """How many rows match the filters."""
    query = _matching(select(func.count()).select_from(audit_events), **filters)
    return int(conn.execute(query).scalar_one())


def exists(conn: Connection, *, before: int | None = None, after: int | None = None,
           **filters: Any) -> bool:
    """Whether a matching row lies below ``before`` or above ``after``."""
    c = audit_events.c
    query = _matching(select(c.seq), **filters)
    query = query.where(c.seq < before) if before is not None else query.where(c.seq > after)
    return conn.execute(query.limit(1)).first() is not None


def matching_rows(conn: Connection, *, after: int, batch: int,
                  **filters: Any) -> list[dict[str, Any]]:
    """The next ``batch`` matching rows after ``after``, in chain order (exports)."""
    c = audit_events.c
    query = _matching(select(audit_events), **filters).where(c.seq > after)
    return [dict(r) for r in conn.execute(query.order_by(c.seq).limit(batch)).mappings()]
