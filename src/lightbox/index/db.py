"""The database handle: engine, durable settings, write transactions, migrations."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DisconnectionError

MIGRATIONS = Path(__file__).parent / "migrations"


class Database:
    """One engine plus the rules for writing to it.

    SQLite allows one writer at a time: writes in this process are
    serialised by a lock, and the busy timeout covers other processes (a CLI
    import next to a running server). Commits are durable before they return
    (WAL with synchronous=FULL; PostgreSQL's default synchronous_commit).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.engine: Engine = _engine(url)
        self._write_lock: Any = threading.Lock() if self.is_sqlite else None
        self._lock_file = _lock_file(self.engine) if self.is_sqlite else None

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A connection inside a transaction that commits on success."""
        with self._write_lock or nullcontext(), self._flock(), self.engine.connect() as conn:
            # SQLite: take the write lock when the transaction begins. A deferred
            # transaction that reads first cannot wait for another process's
            # writer when it comes to write ("database is locked" at once).
            conn.execution_options(lightbox_write=True)
            with conn.begin():
                yield conn

    @contextmanager
    def _flock(self) -> Iterator[None]:
        """SQLite: writers in other processes (HTTP workers, DIMSE processes, a CLI
        import) queue here, woken as soon as the lock is free, instead of polling
        in SQLite's busy handler with sleeps of up to 100 ms."""
        if self._lock_file is None:
            yield
            return
        fcntl.flock(self._lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection for reads (no transaction is kept open afterwards)."""
        with self.engine.connect() as conn:
            yield conn

    def insert(self, table: Any) -> sqlite.Insert | postgresql.Insert:
        """An INSERT that supports ``on_conflict_do_nothing`` on both backends."""
        if self.is_sqlite:
            return sqlite.insert(table)
        return postgresql.insert(table)

    def migrate(self) -> None:
        """Bring the schema to the newest revision."""
        # Imported here: only the process that migrates needs alembic (about
        # 11 MB resident), not every worker and helper.
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with self.write() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "head")

    def dispose(self) -> None:
        self.engine.dispose()
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None


def _lock_file(engine: Engine) -> int | None:
    """A descriptor of ``<database>-writelock`` for ``flock`` (none in memory)."""
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    try:
        return os.open(f"{database}-writelock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:  # a read-only folder: nothing will be written from here anyway
        return None


# A pooled PostgreSQL connection unused for longer than this is checked before
# it is handed out (see ``_ping_when_idle``).
PING_AFTER = 1.0  # seconds


def _engine(url: str) -> Engine:
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if not url.startswith("sqlite"):
        engine = create_engine(url, pool_size=8, max_overflow=8)
        _ping_when_idle(engine)
        return engine
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide where transactions
        # begin: otherwise a SAVEPOINT opens its own transaction and its
        # RELEASE commits (one fsync per instance instead of one per batch).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("lightbox_write", False)
        # On the driver's cursor: through SQLAlchemy this costs more than the
        # statement (see lean); every stored instance begins a transaction.
        cursor = conn.connection.cursor()
        try:
            cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        finally:
            cursor.close()

    return engine


def _ping_when_idle(engine: Engine) -> None:
    """Check a pooled connection before handing it out (a server restarted
    since it was last used would fail the first statement on it) if it has
    waited unused for PING_AFTER seconds or more. SQLAlchemy's own check
    (``pool_pre_ping``) asks the server every time, one more round trip for
    every connection taken, and a stored instance takes one; a connection
    handed back a moment ago is as good as one just checked. A connection that
    fails the check is replaced (the pool tries again with a new one)."""

    @event.listens_for(engine, "connect")
    def _connected(_dbapi_connection: Any, record: Any) -> None:
        record.info["used"] = time.monotonic()

    @event.listens_for(engine, "checkin")
    def _returned(_dbapi_connection: Any, record: Any) -> None:
        record.info["used"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _check(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if time.monotonic() - record.info.get("used", 0.0) < PING_AFTER:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:
            raise DisconnectionError(f"pooled connection is gone: {exc}") from exc


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'index.sqlite'}"
