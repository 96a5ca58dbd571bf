"""Who is calling, and what they may do.

A Principal carries the caller's rights; services ask it, adapters never
decide. Tokens are long random values; only their SHA-256 is stored.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from argon2 import PasswordHasher
from argon2.exceptions import VerificationError
from sqlalchemy import Select

from lightbox.archive import Archive
from lightbox.errors import BadRequest, Forbidden, NotFound, Unauthenticated
from lightbox.index import accounts
from lightbox.index import folders as folder_index
from lightbox.index.folders import Grant

_hasher = PasswordHasher()
TOKEN_PREFIX = "lbx_"
EMAIL = re.compile(r"[^@\s<>\"',;]{1,64}@[A-Za-z0-9.-]{1,189}\.[A-Za-z]{2,63}")
_CACHE_SECONDS = 30.0
SESSION_LABEL = "session"
SESSION_LIFETIME = timedelta(hours=12)


class Grants(Protocol):
    """The folders a member reaches studies through (see services.access)."""

    def may_read(self, study_instance_uid: str) -> bool: ...

    def on(self, study_instance_uid: str) -> tuple[Grant, ...]: ...

    def study_pks(self) -> Select[Any]: ...


@dataclass(frozen=True)
class Principal:
    """An authenticated caller and what they may see.

    ``studies`` limits a token to some studies (share links, desktop-viewer
    launches); ``grants`` limits a member to the studies in their folders.
    With neither, the caller sees the whole archive (administrators, DIMSE
    nodes, the operator).
    """

    user: str
    is_admin: bool
    studies: frozenset[str] | None = None
    read_only: bool = False
    user_id: int | None = None
    organisation_id: int | None = None
    grants: Grants | None = field(default=None, compare=False, repr=False)
    download: bool = True  # False: may view, never take whole files (a link without)

    @property
    def whole_archive(self) -> bool:
        return self.studies is None and self.grants is None

    def may_read(self, study_instance_uid: str) -> bool:
        if self.studies is not None and study_instance_uid not in self.studies:
            return False
        return self.grants is None or self.grants.may_read(study_instance_uid)

    def require_read(self, study_instance_uid: str) -> None:
        # Not Forbidden: a caller must not learn that a study they cannot see exists.
        if not self.may_read(study_instance_uid):
            raise NotFound(f"study {study_instance_uid} not found")

    def require_write(self) -> None:
        if self.read_only:
            raise Forbidden("this token is read-only")

    def require_admin(self) -> None:
        if not self.is_admin or self.read_only:
            raise Forbidden("administrator rights are needed")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


MIN_PASSWORD = 10
# A few of the passwords every guesser tries first; long enough to pass the length rule.
_COMMON = frozenset({
    "password123", "password1234", "1234567890", "12345678910", "qwertyuiop", "iloveyou123",
    "administrator", "letmein1234", "welcome1234", "changeme123", "passw0rd123",
})
MAX_FAILURES = 5  # wrong passwords in a row before the account locks
LOCK_WINDOW = timedelta(minutes=15)


def check_password(name: str, password: str) -> None:
    """The password rules: long, not the user name, not a well-known password."""
    if len(password) < MIN_PASSWORD:
        raise BadRequest(f"a password needs at least {MIN_PASSWORD} characters")
    lowered = password.lower()
    if len(name) >= 3 and name.lower() in lowered:
        raise BadRequest("a password must not contain the user name")
    if lowered in _COMMON or len(set(password)) < 4:
        raise BadRequest("this password is too easy to guess")


def hash_password(password: str, name: str = "") -> str:
    check_password(name, password)
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    if not password_hash:
        return False
    try:
        return _hasher.verify(password_hash, password)
    except VerificationError:
        return False


MAX_DURATION = timedelta(days=100 * 366)  # a century; more is a typo (and overflows datetime)


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``15m``, ``3600s`` or a number of days."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    text = text.strip().lower()
    try:
        if text and text[-1] in units:
            seconds = float(text[:-1]) * units[text[-1]]
        else:
            seconds = float(text) * 86400
    except ValueError as exc:
        raise BadRequest(f"not a duration: {text!r} (use e.g. 30d, 12h, 15m)") from exc
    if not math.isfinite(seconds):
        raise BadRequest(f"not a duration: {text!r} (use e.g. 30d, 12h, 15m)")
    if seconds <= 0:
        raise BadRequest("a duration must be positive")
    if seconds > MAX_DURATION.total_seconds():
        raise BadRequest(f"a duration is at most {MAX_DURATION.days} days")
    return timedelta(seconds=seconds)


def add_user(
    archive: Archive, name: str, password: str | None, *, is_admin: bool,
    organisation: str | None = None, email: str | None = None,
) -> None:
    """A new user, in ``organisation`` (by name; default: the default one)."""
    if not name or len(name) > 128 or not name.isprintable() or "@" in name:
        raise BadRequest("a user name needs 1 to 128 printable characters, without '@'")
    if email is not None and not EMAIL.fullmatch(email.strip()):
        raise BadRequest(f"not an e-mail address: {email[:254]!r}")
    hashed = hash_password(password, name) if password else None
    with archive.db.write() as conn:
        org = folder_index.organisation_id(conn, organisation) if organisation else None
        if organisation and org is None:
            raise NotFound(f"no organisation {organisation!r}")
        user = accounts.add_user(conn, name, hashed, is_admin=is_admin)
        folder_index.set_profile(conn, user.id, email=email.strip() if email else None,
                                 organisation=org)


def add_organisation(archive: Archive, name: str) -> None:
    """A new organisation (the users of one hospital)."""
    name = " ".join(name.split())
    if not name or len(name) > 128 or not name.isprintable():
        raise BadRequest("an organisation name needs 1 to 128 printable characters")
    with archive.db.write() as conn:
        folder_index.add_organisation(conn, name)


def list_organisations(archive: Archive) -> dict[str, list[str]]:
    """Organisation names and their users' names."""
    with archive.db.read() as conn:
        return {name: folder_index.users_of_organisation(conn, org)
                for org, name in folder_index.organisation_names(conn).items()}


def create_token(
    archive: Archive,
    *,
    user: str | None = None,
    expires: timedelta | None = None,
    studies: list[str] | None = None,
    read_only: bool = False,
    label: str | None = None,
) -> str:
    """Issue a token for ``user`` (default: the first administrator, made if none)."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    scope = None
    if studies is not None or read_only:
        scope = json.dumps({"studies": studies, "read_only": read_only})
    expires_at = datetime.now(UTC) + expires if expires else None
    with archive.db.write() as conn:
        owner = accounts.get_user(conn, user) if user else accounts.first_admin(conn)
        if owner is None:
            owner = accounts.add_user(conn, "admin", None, is_admin=True)
        accounts.add_token(
            conn, owner, hash_token(token), expires_at=expires_at, scope=scope, label=label
        )
    return token


def demo_login(archive: Archive) -> tuple[str, str]:
    """The demo's administrator and password, made on first use.

    The password is random and kept in the data folder (readable by its owner
    only), so every ``lightbox demo`` can print it again.
    """
    path = archive.settings.data / "demo-login.txt"
    if path.exists():
        name, _, password = path.read_text().strip().partition(":")
        return name, password
    name, password = "admin", secrets.token_urlsafe(12)
    with archive.db.write() as conn:
        try:
            accounts.get_user(conn, name)
            accounts.set_password(conn, name, hash_password(password, name))
        except NotFound:
            accounts.add_user(conn, name, hash_password(password, name), is_admin=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(f"{name}:{password}\n")
    return name, password


def login(archive: Archive, name: str, password: str) -> str:
    """A browser session token for ``name``; the same answer for every failure.

    After MAX_FAILURES wrong passwords within LOCK_WINDOW the account is locked
    for LOCK_WINDOW, whatever password is tried (and the answer says so only
    once the right password was given, so a guesser learns nothing).
    """
    with archive.db.read() as conn:
        try:
            user = accounts.get_user(conn, name)
        except NotFound:
            user = None
        state = accounts.login_failures_of(conn, user.id) if user is not None else None
    now = datetime.now(UTC)
    locked = state is not None and state.locked_until is not None and state.locked_until > now
    if user is None or user.disabled or not verify_password(user.password_hash, password):
        if user is not None and not locked:
            _note_failure(archive, user.id, state, now)
        raise Unauthenticated("wrong user name or password")
    if locked:
        raise Unauthenticated("too many wrong passwords: the account is locked for a while")
    if state is not None:
        with archive.db.write() as conn:
            accounts.clear_login_failures(conn, user.id)
    return create_token(archive, user=name, expires=SESSION_LIFETIME, label=SESSION_LABEL)


def _note_failure(
    archive: Archive, user_id: int, state: accounts.Failures | None, now: datetime
) -> None:
    if state is None or now - state.window_start > LOCK_WINDOW:
        state = accounts.Failures(0, now, None)
    failures = state.failures + 1
    locked_until = now + LOCK_WINDOW if failures >= MAX_FAILURES else None
    with archive.db.write() as conn:
        accounts.save_login_failures(
            conn, user_id, accounts.Failures(failures, state.window_start, locked_until)
        )


def list_users(archive: Archive) -> list[accounts.User]:
    with archive.db.read() as conn:
        return accounts.list_users(conn)


def disable_user(archive: Archive, name: str, disabled: bool = True) -> None:
    """A disabled user can neither sign in nor use any of their tokens."""
    with archive.db.write() as conn:
        accounts.set_disabled(conn, name, disabled)


def list_tokens(archive: Archive, user: str | None = None) -> list[accounts.TokenInfo]:
    """Tokens (never their values): id, owner, label, scope, dates, revoked."""
    with archive.db.read() as conn:
        return accounts.list_tokens(conn, user)


def revoke_token_id(archive: Archive, token_id: int, *, user: str | None = None) -> None:
    with archive.db.write() as conn:
        accounts.revoke_token_id(conn, token_id, user)


def revoke_token(archive: Archive, token: str) -> None:
    """Revoke a presented token (logout); unknown tokens are ignored."""
    with archive.db.write() as conn:
        accounts.revoke_token(conn, hash_token(token))


class Authenticator:
    """Turns a presented token into a Principal, with a short positive cache."""

    def __init__(self, archive: Archive) -> None:
        self._archive = archive
        self._cache: dict[str, tuple[float, Principal]] = {}
        self._lock = threading.Lock()

    def authenticate(self, token: str) -> Principal:
        digest = hash_token(token)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        principal, lifetime = self._lookup(digest)
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            # Never remembered past the token's own expiry.
            self._cache[digest] = (now + min(_CACHE_SECONDS, lifetime), principal)
        return principal

    def forget(self, token: str) -> None:
        """Drop a token from this process's cache (after revoking it)."""
        with self._lock:
            self._cache.pop(hash_token(token), None)

    def _lookup(self, digest: str) -> tuple[Principal, float]:
        """The token's Principal and how many seconds it stays valid."""
        with self._archive.db.read() as conn:
            row = accounts.token_by_hash(conn, digest)
        if row is None or row.user.disabled:
            raise Unauthenticated("invalid or revoked token")
        lifetime = float("inf")
        if row.expires_at is not None:
            lifetime = (row.expires_at - datetime.now(UTC)).total_seconds()
            if lifetime <= 0:
                raise Unauthenticated("token has expired")
        studies, read_only = None, False
        if row.scope:
            scope = json.loads(row.scope)
            if scope.get("studies") is not None:
                studies = frozenset(scope["studies"])
            read_only = bool(scope.get("read_only"))
        return principal_of(self._archive, row.user, studies=studies, read_only=read_only), lifetime


def principal_of(
    archive: Archive, user: accounts.User, *, studies: frozenset[str] | None = None,
    read_only: bool = False,
) -> Principal:
    """A user's Principal: administrators see everything, members their folders."""
    from lightbox.services.access import FolderGrants  # access builds on this module

    grants = None if user.is_admin else FolderGrants(archive, user.id)
    return Principal(
        user=user.name, is_admin=user.is_admin, studies=studies, read_only=read_only,
        user_id=user.id, organisation_id=user.organisation_id, grants=grants,
    )
