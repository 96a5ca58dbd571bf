"""The index statements run for every instance stored, handed to the driver directly.

Running a statement through SQLAlchemy costs 60-150 microseconds of Python on
the machines this is measured on; SQLite takes 5-10 to run the look-ups and
inserts of one stored instance. For the few statements that ingest runs per
instance, that overhead was a quarter of the processor time of storing one.
A :class:`Lean` statement is still built with SQLAlchemy Core and compiled by
it, once per dialect (and per set of columns, for an INSERT), with its bind
processors (dates as SQLite stores them, say); each call then converts the
values and runs the SQL text on the connection's driver cursor, inside
whatever transaction that connection is in.

Rows come back as plain tuples, without SQLAlchemy's result processing: only
statements whose results need none (integers, strings) belong here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement

_Processor = Callable[[Any], Any] | None
_NO_VALUE = object()


@dataclass(frozen=True)
class _Bind:
    name: str  # as it is named in the SQL text (the driver's name for it)
    key: str  # the caller's parameter
    processor: _Processor
    value: Any  # a value fixed in the statement itself (``+ 1``), else _NO_VALUE


@dataclass(frozen=True)
class _Compiled:
    sql: str
    binds: tuple[_Bind, ...]
    positional: bool

    def parameters(self, params: Mapping[str, Any]) -> Sequence[Any] | dict[str, Any]:
        values = []
        for bind in self.binds:
            value = params[bind.key] if bind.value is _NO_VALUE else bind.value
            values.append(value if bind.processor is None else bind.processor(value))
        if self.positional:
            return values
        return {bind.name: value for bind, value in zip(self.binds, values, strict=True)}


def _compile(statement: ClauseElement, dialect: Dialect,
             column_keys: Sequence[str] | None) -> _Compiled:
    compiled = statement.compile(dialect=dialect, column_keys=list(column_keys or ()) or None)
    assert isinstance(compiled, SQLCompiler)
    by_name = {name: bind for bind, name in compiled.bind_names.items()}
    names = compiled.positiontup if compiled.positional else list(by_name)
    binds = []
    for name in names or ():
        bind = by_name[name]
        fixed = bind.value is not None and not bind.required and bind.callable is None
        binds.append(_Bind(
            name=name,
            key=bind.key,
            processor=bind.type.dialect_impl(dialect).bind_processor(dialect),
            value=bind.value if fixed else _NO_VALUE,
        ))
    return _Compiled(compiled.string, tuple(binds), compiled.positional)


class Lean:
    """A Core statement run on the driver's cursor (see the module docstring).

    Parameters are passed by the names of the statement's ``bindparam``s (for
    an INSERT, by column name: the columns are those of the first row)."""

    def __init__(self, statement: ClauseElement) -> None:
        self._statement = statement
        self._compiled: dict[tuple[str, tuple[str, ...]], _Compiled] = {}

    def _for(self, conn: Connection, keys: Iterable[str] = ()) -> _Compiled:
        columns = tuple(keys)
        found = self._compiled.get((conn.dialect.name, columns))
        if found is None:
            found = _compile(self._statement, conn.dialect, columns)
            self._compiled[(conn.dialect.name, columns)] = found
        return found

    def rows(self, conn: Connection, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Run it once; the rows it returns."""
        return self.send(conn, params)()

    def send(self, conn: Connection, params: Mapping[str, Any]) -> Rows:
        """Run it once; its rows come from the function returned (in a
        ``together`` block, once the server has answered the whole block)."""
        compiled = self._for(conn)
        values = compiled.parameters(params)
        cursor = conn.connection.cursor()
        try:
            with _mapped(conn, compiled.sql, values):
                cursor.execute(compiled.sql, values)
        except BaseException:
            cursor.close()
            raise

        def rows() -> list[tuple[Any, ...]]:
            try:
                with _mapped(conn, compiled.sql, values):
                    return [tuple(row) for row in cursor.fetchall()]
            finally:
                cursor.close()

        return rows

    def run(self, conn: Connection, params: Sequence[Mapping[str, Any]]) -> None:
        """Run it once per parameter set (an INSERT: once per row)."""
        if not params:
            return
        compiled = self._for(conn, params[0].keys() if self._inserts else ())
        values: list[Any] = [compiled.parameters(p) for p in params]
        with _cursor(conn, compiled.sql, values) as cursor:
            cursor.executemany(compiled.sql, values)

    @property
    def _inserts(self) -> bool:
        return bool(getattr(self._statement, "is_insert", False))


Rows = Callable[[], list[tuple[Any, ...]]]


@contextmanager
def _cursor(conn: Connection, sql: str, values: Any) -> Iterator[Any]:
    """A driver cursor of ``conn``, closed after use; the driver's errors are
    raised as SQLAlchemy's (IntegrityError and so on), as the callers expect."""
    cursor = conn.connection.cursor()
    try:
        with _mapped(conn, sql, values):
            yield cursor
    finally:
        cursor.close()


@contextmanager
def _mapped(conn: Connection, sql: str, values: Any) -> Iterator[None]:
    """The driver's errors raised as SQLAlchemy's."""
    try:
        yield
    except conn.dialect.loaded_dbapi.Error as exc:
        raise DBAPIError.instance(sql, values, exc, conn.dialect.loaded_dbapi.Error,
                                  dialect=conn.dialect) from exc


@contextmanager
def together(conn: Connection) -> Iterator[None]:
    """Send the Lean statements of this block to the server together.

    On PostgreSQL they go in psycopg's pipeline mode: one round trip for all
    of them, at the end of the block, instead of one each (a round trip costs
    about as much as the statement itself). Rows of a statement ``send`` sent
    are read after the block (reading them inside waits for the answer to
    everything sent so far); errors are raised at the end of the block, or
    where rows are read, as SQLAlchemy's. Nothing but Lean statements may run
    in the block: SQLAlchemy reads a statement's results as soon as it has
    sent it. SQLite runs in this process, and there nothing changes.
    """
    driver = conn.connection.driver_connection
    pipeline = getattr(driver, "pipeline", None)
    if conn.dialect.name != "postgresql" or pipeline is None:
        yield
        return
    with _mapped(conn, "(statements sent together)", None), pipeline():
        yield


class LeanIn:
    """A SELECT whose WHERE clause takes a list of values (``col IN (...)``),
    as one Lean statement per length of list. ``build(n)`` makes the
    statement for ``n`` values, bound as ``v0`` ... ``v{n-1}``."""

    def __init__(self, build: Callable[[int], ClauseElement], most: int) -> None:
        self._build = build
        self._most = most
        self._by_length: dict[int, Lean] = {}

    def rows(self, conn: Connection, values: Sequence[Any]) -> list[tuple[Any, ...]]:
        """The rows for all ``values``, in lists of at most ``most``."""
        return self.send(conn, values)()

    def send(self, conn: Connection, values: Sequence[Any]) -> Rows:
        """As ``Lean.send``: the statements for all ``values`` sent, and a
        function that returns their rows."""
        sent: list[Rows] = []
        for start in range(0, len(values), self._most):
            chunk = values[start:start + self._most]
            lean = self._by_length.get(len(chunk))
            if lean is None:
                lean = self._by_length[len(chunk)] = Lean(self._build(len(chunk)))
            sent.append(lean.send(conn, {f"v{i}": value for i, value in enumerate(chunk)}))
        return lambda: [row for rows in sent for row in rows()]
