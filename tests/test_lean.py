"""Statements run on the driver's cursor store and find what SQLAlchemy would."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import bindparam, select, update
from sqlalchemy.exc import IntegrityError

from lightbox.archive import Archive
from lightbox.index import instances as index
from lightbox.index.lean import Lean, LeanIn
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
        assert index.filed_series(conn, ["no such series"]) == {}
        assert conn.execute(select(studies.c.pk).where(
            studies.c.study_instance_uid == "1.2.3.5")).first() is None
