"""Users and API tokens in the index. Token values are never stored, only hashes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import (
    Column,
    Connection,
    DateTime,
    ForeignKey,
    Integer,
    Table,
    delete,
    func,
    select,
    update,
)

from lightbox.errors import Conflict, NotFound
from lightbox.index.schema import as_utc, metadata, tokens, users

login_failures = Table(
    "login_failures",
    metadata,
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("failures", Integer, nullable=False),
    Column("window_start", DateTime(timezone=True), nullable=False),
    Column("locked_until", DateTime(timezone=True), nullable=True),
)


@dataclass(frozen=True)
class User:
    id: int
    name: str
    is_admin: bool
    disabled: bool
    password_hash: str | None
    organisation_id: int = 1
    email: str | None = None


@dataclass(frozen=True)
class TokenRow:
    user: User
    scope: str | None
    expires_at: datetime | None


def _user(row: object) -> User:
    return User(
        id=row.id,  # type: ignore[attr-defined]
        name=row.name,  # type: ignore[attr-defined]
        is_admin=bool(row.is_admin),  # type: ignore[attr-defined]
        disabled=bool(row.disabled),  # type: ignore[attr-defined]
        password_hash=row.password_hash,  # type: ignore[attr-defined]
        organisation_id=int(row.organisation_id),  # type: ignore[attr-defined]
        email=row.email,  # type: ignore[attr-defined]
    )


def add_user(conn: Connection, name: str, password_hash: str | None, *, is_admin: bool) -> User:
    """Create a user; Conflict when the name is taken."""
    if conn.execute(select(users.c.id).where(users.c.name == name)).first() is not None:
        raise Conflict(f"user {name!r} already exists")
    conn.execute(
        users.insert().values(
            name=name,
            password_hash=password_hash,
            is_admin=is_admin,
            disabled=False,
            created_at=datetime.now(UTC),
        )
    )
    return get_user(conn, name)


def get_user(conn: Connection, name: str) -> User:
    row = conn.execute(select(users).where(users.c.name == name)).first()
    if row is None:
        raise NotFound(f"no user named {name!r}")
    return _user(row)


def first_admin(conn: Connection) -> User | None:
    row = conn.execute(
        select(users)
        .where(users.c.is_admin.is_(True), users.c.disabled.is_(False))
        .order_by(users.c.id)
    ).first()
    return _user(row) if row is not None else None


def list_users(conn: Connection) -> list[User]:
    return [_user(r) for r in conn.execute(select(users).order_by(users.c.name))]


def set_password(conn: Connection, name: str, password_hash: str) -> None:
    done = conn.execute(
        update(users).where(users.c.name == name).values(password_hash=password_hash)
    )
    if done.rowcount == 0:
        raise NotFound(f"no user named {name!r}")


def add_token(
    conn: Connection,
    user: User,
    token_hash: str,
    *,
    expires_at: datetime | None,
    scope: str | None = None,
    label: str | None = None,
) -> None:
    conn.execute(
        tokens.insert().values(
            user_id=user.id,
            token_hash=token_hash,
            label=label,
            scope=scope,
            expires_at=expires_at,
            created_at=datetime.now(UTC),
            revoked=False,
        )
    )


def token_by_hash(conn: Connection, token_hash: str) -> TokenRow | None:
    row = conn.execute(
        select(users, tokens.c.scope, tokens.c.expires_at)
        .join(tokens, tokens.c.user_id == users.c.id)
        .where(tokens.c.token_hash == token_hash, tokens.c.revoked.is_(False))
    ).first()
    if row is None:
        return None
    return TokenRow(user=_user(row), scope=row.scope, expires_at=as_utc(row.expires_at))


def revoke_token(conn: Connection, token_hash: str) -> None:
    conn.execute(update(tokens).where(tokens.c.token_hash == token_hash).values(revoked=True))


def set_disabled(conn: Connection, name: str, disabled: bool) -> None:
    done = conn.execute(update(users).where(users.c.name == name).values(disabled=disabled))
    if done.rowcount == 0:
        raise NotFound(f"no user named {name!r}")


@dataclass(frozen=True)
class TokenInfo:
    id: int
    user: str
    label: str | None
    scope: str | None
    created_at: datetime
    expires_at: datetime | None
    revoked: bool


def list_tokens(conn: Connection, user: str | None = None) -> list[TokenInfo]:
    query = (
        select(tokens.c.id, users.c.name, tokens.c.label, tokens.c.scope, tokens.c.created_at,
               tokens.c.expires_at, tokens.c.revoked)
        .join(users, tokens.c.user_id == users.c.id)
        .order_by(tokens.c.id)
    )
    if user is not None:
        query = query.where(users.c.name == user)
    return [
        TokenInfo(r.id, r.name, r.label, r.scope, as_utc(r.created_at),
                  as_utc(r.expires_at), bool(r.revoked))
        for r in conn.execute(query)
    ]


def revoke_token_id(conn: Connection, token_id: int, user: str | None = None) -> None:
    """Revoke by id; with ``user``, only that user's token (NotFound otherwise)."""
    condition = tokens.c.id == token_id
    if user is not None:
        owner = select(users.c.id).where(users.c.name == user).scalar_subquery()
        condition = condition & (tokens.c.user_id == owner)
    if conn.execute(update(tokens).where(condition).values(revoked=True)).rowcount == 0:
        raise NotFound(f"no token {token_id}")


@dataclass(frozen=True)
class Failures:
    failures: int
    window_start: datetime
    locked_until: datetime | None


def login_failures_of(conn: Connection, user_id: int) -> Failures | None:
    row = conn.execute(
        select(login_failures).where(login_failures.c.user_id == user_id)
    ).first()
    if row is None:
        return None
    return Failures(row.failures, as_utc(row.window_start),
                    as_utc(row.locked_until))


def save_login_failures(conn: Connection, user_id: int, state: Failures) -> None:
    conn.execute(delete(login_failures).where(login_failures.c.user_id == user_id))
    conn.execute(login_failures.insert().values(
        user_id=user_id, failures=state.failures, window_start=state.window_start,
        locked_until=state.locked_until))


def clear_login_failures(conn: Connection, user_id: int) -> None:
    conn.execute(delete(login_failures).where(login_failures.c.user_id == user_id))


def count_users(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(users)).scalar_one())
