"""The audit trail in the index: append-only rows linked by a hash chain.

Each row stores the hash of the row before it and its own hash over its
content. ``audit_head`` holds the sequence number and hash of the newest row;
appending locks it, so writers in several processes extend one chain.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
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


def as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes: read them as UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value
