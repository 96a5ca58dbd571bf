"""Statements run on the driver's cursor store and find what SQLAlchemy would."""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg
import pytest
from sqlalchemy import Connection, bindparam, select, update
from sqlalchemy.exc import IntegrityError

from lightbox.archive import Archive
from lightbox.index import instances as index
from lightbox.index.lean import Lean, LeanIn, together
from lightbox.index.schema import studies
from lightbox.services.ingest import Status, store_instances
from tests.factories import ct_dataset, to_bytes
from tests.test_ingest import staged

WHEN = datetime(2026, 3, 4, 5, 6, 7, 891011, tzinfo=UTC)


def _study_row(uid: str) -> dict[str, object]:
    return {"study_instance_uid": uid, "patient_pk": 1, "number_of_series": 0,
            "number_of_instances": 0, "created_at": WHEN, "updated_at": WHEN}


@pytest.fixture
def patient(archive: Archive) -> Archive:
    """An archive whose index holds one stored instance (and so patient 1)."""
    outcome = store_instances(archive, [staged(archive, to_bytes(ct_dataset()))])
    assert outcome[0].status is Status.STORED
    return archive


def test_insert_stores_values_as_sqlalchemy_reads_them(patient: Archive) -> None:
    """A date goes through the dialect's own conversion (a string on SQLite)
    and reads back unchanged through SQLAlchemy."""
    insert = Lean(studies.insert())
    with patient.db.write() as conn:
        insert.run(conn, [_study_row("1.2.3.1"), _study_row("1.2.3.2")])
    with patient.db.read() as conn:
        rows = conn.execute(select(studies.c.study_instance_uid, studies.c.created_at)
                            .where(studies.c.study_instance_uid.like("1.2.3.%"))
                            .order_by(studies.c.study_instance_uid)).all()
    assert [r.study_instance_uid for r in rows] == ["1.2.3.1", "1.2.3.2"]
    assert all(r.created_at.replace(tzinfo=UTC) == WHEN for r in rows)


def test_values_fixed_in_the_statement_and_named_ones_both_apply(patient: Archive) -> None:
    bump = Lean(update(studies).where(studies.c.study_instance_uid == bindparam("uid"))
                .values(number_of_series=studies.c.number_of_series + 1,
                        number_of_instances=studies.c.number_of_instances + bindparam("n")))
    with patient.db.write() as conn:
        Lean(studies.insert()).run(conn, [_study_row("1.2.3.9")])
        bump.run(conn, [{"uid": "1.2.3.9", "n": 5}, {"uid": "1.2.3.9", "n": 2}])
    with patient.db.read() as conn:
        found = Lean(select(studies.c.number_of_series, studies.c.number_of_instances)
                     .where(studies.c.study_instance_uid == bindparam("uid")))
        assert found.rows(conn, {"uid": "1.2.3.9"}) == [(2, 7)]


def test_lists_of_any_length_are_looked_up_in_chunks(patient: Archive) -> None:
    uids = [f"1.2.4.{i}" for i in range(23)]
    with patient.db.write() as conn:
        Lean(studies.insert()).run(conn, [_study_row(uid) for uid in uids])
    find = LeanIn(lambda n: select(studies.c.study_instance_uid).where(
        studies.c.study_instance_uid.in_([bindparam(f"v{i}") for i in range(n)])), most=5)
    with patient.db.read() as conn:
        for asked in ([], uids[:1], uids[3:9], [*uids, "9.9.9"]):
            found = sorted(uid for (uid,) in find.rows(conn, asked))
            assert found == sorted(set(asked) - {"9.9.9"})
        # Hostile values are values: nothing matches, nothing breaks.
        assert find.rows(conn, ["' OR 1=1 --", "%", "_"]) == []


def test_a_broken_constraint_is_sqlalchemys_integrity_error(patient: Archive) -> None:
    """Ingest relies on it to look up again inside the transaction."""
    insert = Lean(studies.insert())
    with pytest.raises(IntegrityError), patient.db.write() as conn:
        insert.run(conn, [_study_row("1.2.3.5"), _study_row("1.2.3.5")])
    with patient.db.read() as conn:
        assert index.look_up(conn, ["1.2.3.5"], ["no such series"]) == (set(), {})
        assert conn.execute(select(studies.c.pk).where(
            studies.c.study_instance_uid == "1.2.3.5")).first() is None


def _pipelined(conn: Connection) -> bool:
    """Whether statements on ``conn`` are being queued (psycopg's pipeline mode)."""
    pgconn = getattr(conn.connection.driver_connection, "pgconn", None)
    return pgconn is not None and pgconn.pipeline_status != psycopg.pq.PipelineStatus.OFF


def test_statements_sent_together_all_apply(patient: Archive) -> None:
    bump = Lean(update(studies).where(studies.c.study_instance_uid == bindparam("uid"))
                .values(number_of_instances=studies.c.number_of_instances + bindparam("n")))
    with patient.db.write() as conn:
        with together(conn):
            # Queued on PostgreSQL, one round trip at the end of the block.
            assert _pipelined(conn) == (conn.dialect.name == "postgresql")
            Lean(studies.insert()).run(conn, [_study_row("1.2.3.7"), _study_row("1.2.3.8")])
            bump.run(conn, [{"uid": "1.2.3.7", "n": 3}, {"uid": "1.2.3.8", "n": 4}])
        assert not _pipelined(conn)
    with patient.db.read() as conn:
        found = conn.execute(select(studies.c.study_instance_uid, studies.c.number_of_instances)
                             .where(studies.c.study_instance_uid.in_(["1.2.3.7", "1.2.3.8"]))
                             .order_by(studies.c.study_instance_uid)).all()
    assert [tuple(r) for r in found] == [("1.2.3.7", 3), ("1.2.3.8", 4)]


def test_a_broken_constraint_sent_together_is_integrity_error_at_the_end(
    patient: Archive,
) -> None:
    """Raised when the block ends (where PostgreSQL answers), as SQLAlchemy's
    IntegrityError; nothing of the transaction stays, and the next write works."""
    insert = Lean(studies.insert())
    with pytest.raises(IntegrityError), patient.db.write() as conn, together(conn):
        insert.run(conn, [_study_row("1.2.3.6")])
        insert.run(conn, [_study_row("1.2.3.6")])
    with patient.db.write() as conn:
        insert.run(conn, [_study_row("1.2.3.4")])
    with patient.db.read() as conn:
        found = conn.execute(select(studies.c.study_instance_uid).where(
            studies.c.study_instance_uid.in_(["1.2.3.6", "1.2.3.4"]))).scalars().all()
    assert found == ["1.2.3.4"]
