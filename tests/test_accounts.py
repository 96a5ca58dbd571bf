"""Accounts: password rules, lock-out after wrong passwords, disabled users,
token listing and revocation, from the services, the login page and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import update

from lightbox.archive import Archive
from lightbox.errors import BadRequest, Unauthenticated
from lightbox.index.accounts import login_failures
from lightbox.services import auth
from tests.conftest import RunningServer

GOOD = "a long pass phrase"


@pytest.mark.parametrize(
    ("password", "reason"),
    [
        ("short", "at least 10 characters"),
        ("grace-hopper-1906", "user name"),
        ("Password123", "too easy"),
        ("aaaaaaaaaaaa", "too easy"),
    ],
)
def test_weak_passwords_are_refused(archive: Archive, password: str, reason: str) -> None:
    with pytest.raises(BadRequest, match=reason):
        auth.add_user(archive, "grace-hopper", password, is_admin=False)


def test_the_account_locks_after_repeated_wrong_passwords(archive: Archive) -> None:
    auth.add_user(archive, "ivan", GOOD, is_admin=False)
    for _ in range(auth.MAX_FAILURES):
        with pytest.raises(Unauthenticated, match="wrong user name or password"):
            auth.login(archive, "ivan", "not the password")
    with pytest.raises(Unauthenticated, match="locked"):
        auth.login(archive, "ivan", GOOD)
    # While locked, a wrong guess learns nothing new and does not extend the lock.
    with pytest.raises(Unauthenticated, match="wrong user name or password"):
        auth.login(archive, "ivan", "still guessing")
    past = datetime.now(UTC) - timedelta(seconds=1)
    with archive.db.write() as conn:
        conn.execute(update(login_failures).values(locked_until=past))
    assert auth.login(archive, "ivan", GOOD).startswith(auth.TOKEN_PREFIX)
    # Success clears the count: four more failures do not lock again.
    for _ in range(auth.MAX_FAILURES - 1):
        with pytest.raises(Unauthenticated):
            auth.login(archive, "ivan", "nope nope nope")
    assert auth.login(archive, "ivan", GOOD)


def test_failures_outside_the_window_start_over(archive: Archive) -> None:
    auth.add_user(archive, "judy", GOOD, is_admin=False)
    for _ in range(auth.MAX_FAILURES - 1):
        with pytest.raises(Unauthenticated):
            auth.login(archive, "judy", "wrong wrong wrong")
    old = datetime.now(UTC) - auth.LOCK_WINDOW - timedelta(minutes=1)
    with archive.db.write() as conn:
        conn.execute(update(login_failures).values(window_start=old))
    with pytest.raises(Unauthenticated, match="wrong user"):
        auth.login(archive, "judy", "wrong wrong wrong")
    assert auth.login(archive, "judy", GOOD)


def test_a_disabled_user_can_neither_sign_in_nor_use_tokens(archive: Archive) -> None:
    auth.add_user(archive, "kim", GOOD, is_admin=False)
    token = auth.create_token(archive, user="kim", expires=timedelta(hours=1))
    auth.disable_user(archive, "kim")
    with pytest.raises(Unauthenticated):
        auth.login(archive, "kim", GOOD)
    with pytest.raises(Unauthenticated):
        auth.Authenticator(archive).authenticate(token)
    auth.disable_user(archive, "kim", False)
    assert auth.Authenticator(archive).authenticate(token).user == "kim"


def test_tokens_are_listed_without_values_and_can_be_revoked(archive: Archive) -> None:
    auth.add_user(archive, "leo", GOOD, is_admin=False)
    token = auth.create_token(archive, user="leo", expires=timedelta(days=1), label="slicer")
    listed = auth.list_tokens(archive, "leo")
    assert [(t.user, t.label, t.revoked) for t in listed] == [("leo", "slicer", False)]
    assert token not in repr(listed)
    with pytest.raises(Exception, match="no token"):
        auth.revoke_token_id(archive, listed[0].id, user="someone-else")
    auth.revoke_token_id(archive, listed[0].id, user="leo")
    assert auth.list_tokens(archive, "leo")[0].revoked
    with pytest.raises(Unauthenticated):
        auth.Authenticator(archive).authenticate(token)


def test_the_login_page_reports_a_lock(server: RunningServer) -> None:
    auth.add_user(server.archive, "mona", GOOD, is_admin=False)
    with httpx.Client(base_url=server.url, headers={"Origin": server.url}) as client:
        for _ in range(auth.MAX_FAILURES):
            wrong = client.post("/login", data={"username": "mona", "password": "x" * 12})
            assert wrong.status_code == 401
        right = client.post("/login", data={"username": "mona", "password": GOOD})
    assert right.status_code == 401 and "locked" in right.text


def test_cli_lists_disables_and_revokes(archive: Archive) -> None:
    env = {**os.environ, "LIGHTBOX_DATA": str(archive.settings.data),
           "LIGHTBOX_DATABASE": archive.settings.database}

    def lightbox(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "lightbox", *args], env=env, input=stdin,
                              capture_output=True, text=True, timeout=120)

    assert lightbox("user", "add", "nina", stdin=GOOD + "\n").returncode == 0
    made = lightbox("token", "create", "--user", "nina", "--label", "laptop")
    assert made.returncode == 0
    assert lightbox("user", "list").stdout.splitlines() == ["nina\tmember\tactive\tdefault\t-"]
    listed = lightbox("token", "list", "--user", "nina").stdout.splitlines()
    assert len(listed) == 1 and "\tnina\tlaptop\t" in listed[0]
    assert made.stdout.strip() not in listed[0]
    token_id = listed[0].split("\t")[0]
    assert lightbox("token", "revoke", token_id).returncode == 0
    assert lightbox("token", "list").stdout.rstrip().endswith("revoked")
    assert lightbox("user", "disable", "nina").returncode == 0
    assert lightbox("user", "list").stdout.splitlines() == [
        "nina\tmember\tdisabled\tdefault\t-"]
    assert lightbox("token", "revoke", "999").returncode == 2


def test_the_account_page_creates_shows_once_and_revokes_tokens(server: RunningServer) -> None:
    auth.add_user(server.archive, "olga", GOOD, is_admin=False)
    with httpx.Client(base_url=server.url, headers={"Origin": server.url}) as client:
        client.post("/login", data={"username": "olga", "password": GOOD})
        made = client.post("/account", data={"label": "scripts", "expires": "7d"})
        assert made.status_code == 200
        token = made.text.split('id="new-token">', 1)[1].split("<", 1)[0]
        assert token.startswith(auth.TOKEN_PREFIX)
        headers = {"Authorization": f"Bearer {token}"}
        assert httpx.get(server.dicomweb + "/studies", headers=headers).status_code == 200
        page = client.get("/account")
        assert "scripts" in page.text and token not in page.text
        mine = [t for t in auth.list_tokens(server.archive, "olga") if t.label == "scripts"]
        assert len(mine) == 1
        assert client.post(f"/account/tokens/{mine[0].id}/revoke").status_code == 303
        forged = client.post(f"/account/tokens/{mine[0].id}/revoke",
                             headers={"Origin": "http://evil.example"})
        assert forged.status_code == 403
        too_long = client.post("/account", data={"label": "x", "expires": "400d"})
        assert too_long.status_code == 400
    with pytest.raises(Unauthenticated):
        auth.Authenticator(server.archive).authenticate(token)


def test_a_user_cannot_revoke_another_users_token(server: RunningServer) -> None:
    auth.add_user(server.archive, "pia", GOOD, is_admin=False)
    theirs = auth.create_token(server.archive, expires=timedelta(days=1), label="admin's")
    their_id = next(t.id for t in auth.list_tokens(server.archive) if t.label == "admin's")
    with httpx.Client(base_url=server.url, headers={"Origin": server.url}) as client:
        client.post("/login", data={"username": "pia", "password": GOOD})
        assert client.post(f"/account/tokens/{their_id}/revoke").status_code == 404
    assert auth.Authenticator(server.archive).authenticate(theirs).is_admin
