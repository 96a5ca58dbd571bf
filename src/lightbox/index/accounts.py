"""Users and API tokens in the index. Token values are never stored, only hashes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, func, select, update

from lightbox.errors import Conflict, NotFound
from lightbox.index.schema import tokens, users


@dataclass(frozen=True)
class User:
    id: int
    name: str
    is_admin: bool
    disabled: bool
    password_hash: str | None


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
    expires = row.expires_at
    if expires is not None and expires.tzinfo is None:
        expires = expires.replace(tzinfo=UTC)  # SQLite hands back naive datetimes
    return TokenRow(user=_user(row), scope=row.scope, expires_at=expires)


def revoke_token(conn: Connection, token_hash: str) -> None:
    conn.execute(update(tokens).where(tokens.c.token_hash == token_hash).values(revoked=True))


def count_users(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(users)).scalar_one())
