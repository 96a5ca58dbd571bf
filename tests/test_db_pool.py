"""PostgreSQL's connection pool: a connection is checked only after waiting unused.

(SQLite has no server to restart and no pool to check: these are PostgreSQL's.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import text

from lightbox.index import db as dbmod
from lightbox.index.db import Database
from tests.conftest import PG_ADMIN, database_url


@pytest.fixture
def pg(tmp_path: Path) -> Iterator[Database]:
    with database_url("postgresql", tmp_path) as url:
        database = Database(url)
        try:
            yield database
        finally:
            database.dispose()


def _pid(database: Database) -> int:
    with database.read() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _pings(database: Database, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    pings: list[int] = []
    real = database.engine.dialect.do_ping

    def counted(dbapi_connection: Any) -> bool:
        pings.append(1)
        return bool(real(dbapi_connection))

    monkeypatch.setattr(database.engine.dialect, "do_ping", counted)
    return pings


def test_a_connection_handed_back_a_moment_ago_is_not_checked(
    pg: Database, monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = _pid(pg)
    pings = _pings(pg, monkeypatch)
    assert [_pid(pg) for _ in range(5)] == [first] * 5  # the same connection, reused
    assert pings == []


def test_a_connection_the_server_dropped_while_it_waited_is_replaced(
    pg: Database, monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = _pid(pg)
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:  # a server restart, for it
        admin.execute("SELECT pg_terminate_backend(%s)", (first,))
    pings = _pings(pg, monkeypatch)
    monkeypatch.setattr(dbmod, "PING_AFTER", 0.0)  # it has waited long enough
    second = _pid(pg)
    assert second != first, "a new connection, and no error for the caller"
    assert pings == [1, 1]  # the dead one failed its check, the new one passed
