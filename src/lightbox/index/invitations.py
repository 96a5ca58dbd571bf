"""Invitations in the index: to the organisation, or to a folder with a role.

Invitation tokens are stored as SHA-256 only.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import (
    Column,
    Connection,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Table,
    select,
    update,
)

from lightbox.index.schema import as_utc, metadata

invitations = Table(
    "invitations",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("email", String(254), nullable=False),
    Column("organisation_id", Integer, ForeignKey("organisations.id"), nullable=False),
    Column("folder_id", Integer, ForeignKey("folders.id", ondelete="CASCADE"), nullable=True),
    Column("role", String(16), nullable=True),
    Column("invited_by", String(128), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("accepted_at", DateTime(timezone=True), nullable=True),
)


@dataclass(frozen=True)
class InvitationRow:
    id: int
    email: str
    organisation_id: int
    folder_id: int | None
    role: str | None
    invited_by: str
    expires_at: datetime
    accepted_at: datetime | None


def add_invitation(conn: Connection, *, token_hash: str, email: str, organisation: int,
                   folder_id: int | None, role: str | None, invited_by: str,
                   expires_at: datetime) -> None:
    conn.execute(invitations.insert().values(
        token_hash=token_hash, email=email, organisation_id=organisation, folder_id=folder_id,
        role=role, invited_by=invited_by, created_at=datetime.now(UTC), expires_at=expires_at))


def invitation(conn: Connection, token_hash: str) -> InvitationRow | None:
    r = conn.execute(select(invitations).where(invitations.c.token_hash == token_hash)).first()
    if r is None:
        return None
    return InvitationRow(r.id, r.email, int(r.organisation_id), r.folder_id, r.role,
                         r.invited_by, as_utc(r.expires_at),
                         as_utc(r.accepted_at) if r.accepted_at is not None else None)


def accept_invitation(conn: Connection, invitation_id: int) -> bool:
    """Mark accepted; False when it already was (two tabs, one invitation)."""
    done = conn.execute(update(invitations).where(
        invitations.c.id == invitation_id, invitations.c.accepted_at.is_(None),
    ).values(accepted_at=datetime.now(UTC)))
    return done.rowcount == 1
