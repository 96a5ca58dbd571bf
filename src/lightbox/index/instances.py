"""Writing instances to the index, reading them back for retrieval, deleting."""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BindParameter, Connection, bindparam, delete, func, select, update

from lightbox.dicom.attributes import Kind, QueryLevel, at_level
from lightbox.dicom.frames import PixelLayout
from lightbox.dicom.instance import InstanceRecord
from lightbox.errors import Conflict, NotFound
from lightbox.index.db import Database
from lightbox.index.lean import Lean, LeanIn, together
from lightbox.index.schema import instances, patients, series, studies


class Stored(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    REPLACED = "replaced"


@dataclass(frozen=True)
class StoredInstance:
    """What retrieval needs about one instance, without opening the file."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    blob_key: str
    size: int
    layout: PixelLayout | None
    number_of_frames: int


def _columns(level: QueryLevel, record: InstanceRecord) -> dict[str, Any]:
    return {
        a.column: record.values.get(a.column) for a in at_level(level) if a.column in record.values
    }


def patient_identity(values: dict[str, Any]) -> str:
    """Patients are told apart by Patient ID within its issuer; without an ID, by name."""
    pid = values.get("patient_id") or ""
    issuer = values.get("issuer_of_patient_id") or ""
    if pid:
        return f"{issuer}|{pid}"
    return f"{issuer}||{values.get('patient_name') or ''}"


def name_words(name: str | None) -> str | None:
    """Person name as upper-case words between spaces, for fuzzy matching."""
    if not name:
        return None
    words = name.replace("^", " ").replace("=", " ").upper().split()
    return " " + " ".join(words) + " "


_INSTANCE_ATTRIBUTES = tuple(a for a in at_level(QueryLevel.INSTANCE) if a.kind is not Kind.COUNT)
# The statements run for every instance stored go to the driver directly (see lean).
_FIND_OLD = Lean(select(instances.c.pk, instances.c.blob_key, instances.c.study_pk).where(
    instances.c.sop_instance_uid == bindparam("sop")
))
_INSERT_INSTANCE = Lean(instances.insert().inline())  # inline: no RETURNING of the new pk
_ADD_TO_SERIES = Lean(
    update(series)
    .where(series.c.pk == bindparam("series"))
    .values(number_of_instances=series.c.number_of_instances + bindparam("added"))
)
_IN_CHUNK = 500  # values per IN list: well inside SQLite's and PostgreSQL's limits


def _values(n: int) -> list[BindParameter[Any]]:
    return [bindparam(f"v{i}") for i in range(n)]


_STORED_SOPS = LeanIn(
    lambda n: select(instances.c.sop_instance_uid).where(
        instances.c.sop_instance_uid.in_(_values(n))),
    _IN_CHUNK,
)
_FILED_SERIES = LeanIn(
    lambda n: select(series.c.series_instance_uid, series.c.pk, series.c.study_pk,
                     studies.c.study_instance_uid)
    .join(studies, studies.c.pk == series.c.study_pk)
    .where(series.c.series_instance_uid.in_(_values(n))),
    _IN_CHUNK,
)


def store(
    db: Database,
    conn: Connection,
    record: InstanceRecord,
    blob_key: str,
    *,
    overwrite: bool,
    known: dict[tuple[str, str], tuple[int, int]] | None = None,
) -> tuple[Stored, str | None, int | None]:
    """Index one instance inside the caller's transaction.

    Returns the outcome; when an earlier copy was replaced or the new one is a
    duplicate, the blob key that is no longer referenced; and the study whose
    counters the caller must bring up to date with ``refresh_studies`` before
    committing (once per batch, not once per instance).
    ``known`` remembers series rows across the calls of one transaction
    ((study UID, series UID) -> (series pk, study pk)): an instance naming
    the same series under another study still meets the check. Clear it after
    a rollback.
    Raises Conflict when the series is already filed under another study.
    """
    now = datetime.now(UTC)
    found = _FIND_OLD.rows(conn, {"sop": record.sop_instance_uid})
    old = found[0] if found else None
    if old is not None and not overwrite:
        return Stored.DUPLICATE, blob_key, None
    if old is not None:
        old_pk, old_key, old_study = old
        _delete_instance_rows(conn, [old_pk])
    filed = (record.study_instance_uid, record.series_instance_uid)
    cached = known.get(filed) if known is not None else None
    if cached is not None and not overwrite:
        series_pk, study_pk = cached  # the batch's earlier instance made both rows
    else:
        study_pk = _study(db, conn, record, now)
        series_pk = _series(db, conn, record, study_pk)
        if known is not None:
            known[filed] = (series_pk, study_pk)
    _insert(conn, [instance_row(record, blob_key, series_pk, study_pk, now)])
    if old is not None:
        # The replaced copy may have been the last of another series or study.
        _prune(conn, {old_study}, now)
        return Stored.REPLACED, old_key, study_pk
    return Stored.STORED, None, study_pk


def instance_row(
    record: InstanceRecord, blob_key: str, series_pk: int, study_pk: int, now: datetime
) -> dict[str, Any]:
    """The instances row of ``record``, stored as ``blob_key``."""
    row = {a.column: record.values.get(a.column) for a in _INSTANCE_ATTRIBUTES}
    row.update(
        series_pk=series_pk,
        study_pk=study_pk,
        blob_key=blob_key,
        size=record.size,
        pixel_layout=record.layout.to_bytes() if record.layout else None,
        dicom_json=record.metadata,
        created_at=now,
    )
    return row


def insert_instances(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Insert instance rows of series that exist (one statement for all), and
    count them in their series."""
    if rows:
        _insert(conn, rows)


def add_instances(conn: Connection, rows: Sequence[dict[str, Any]], refresh: set[int],
                  added: dict[int, int]) -> None:
    """``insert_instances``, then ``refresh_studies``; when no study is to be
    recounted (a recount reads through SQLAlchemy), the inserts and
    increments are sent to the server together."""
    with nullcontext() if refresh else together(conn):
        insert_instances(conn, rows)
        refresh_studies(conn, refresh, added)


def _insert(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    _INSERT_INSTANCE.run(conn, rows)
    added = Counter(row["series_pk"] for row in rows)
    _ADD_TO_SERIES.run(conn, [{"series": pk, "added": n} for pk, n in added.items()])


def look_up(conn: Connection, sops: Sequence[str], series_uids: Sequence[str],
            ) -> tuple[set[str], dict[str, tuple[int, int, str]]]:
    """Which of ``sops`` (SOP Instance UIDs) are indexed already, and which
    of the series ``series_uids`` are: series UID -> (series pk, study pk,
    Study Instance UID). On PostgreSQL both questions go in one round trip."""
    with together(conn):
        taken = _STORED_SOPS.send(conn, sops)
        filed = _FILED_SERIES.send(conn, sorted(set(series_uids)))
    return {sop for (sop,) in taken()}, {
        uid: (series_pk, study_pk, study) for uid, series_pk, study_pk, study in filed()}


_ADD_TO_STUDY = Lean(
    update(studies)
    .where(studies.c.pk == bindparam("study"))
    .values(number_of_instances=studies.c.number_of_instances + bindparam("added"),
            updated_at=bindparam("now"))
)


def refresh_studies(
    conn: Connection, study_pks: set[int], added: dict[int, int] | None = None
) -> None:
    """Bring counters and ModalitiesInStudy of ``study_pks`` up to date, and
    count ``added`` instances (study pk -> how many) in studies that only
    gained instances of series they had already: their series count and
    modalities stay, so one increment does (a study in both is recounted).
    Studies are locked in one order (by pk), whichever way they are brought
    up to date."""
    now = datetime.now(UTC)
    added = added or {}
    for study_pk in sorted(study_pks | added.keys()):
        if study_pk in study_pks:
            _refresh_study(conn, study_pk, now)
        else:
            _ADD_TO_STUDY.run(conn, [{"study": study_pk, "added": added[study_pk], "now": now}])


def series_elsewhere(series_uid: str) -> Conflict:
    """The refusal of an instance naming a series that another study holds."""
    return Conflict(f"series {series_uid} is already stored in another study")


def _study(db: Database, conn: Connection, record: InstanceRecord, now: datetime) -> int:
    found = conn.execute(
        select(studies.c.pk).where(studies.c.study_instance_uid == record.study_instance_uid)
    ).scalar()
    if found is not None:
        return int(found)
    pvalues = _columns(QueryLevel.PATIENT, record)
    identity = patient_identity(pvalues)
    conn.execute(db.insert(patients).values(identity=identity, **pvalues).on_conflict_do_nothing())
    patient_pk = conn.execute(
        select(patients.c.pk).where(patients.c.identity == identity)
    ).scalar_one()
    conn.execute(
        db.insert(studies)
        .values(
            patient_pk=patient_pk,
            **pvalues,
            **_columns(QueryLevel.STUDY, record),
            patient_name_words=name_words(pvalues.get("patient_name")),
            number_of_series=0,
            number_of_instances=0,
            created_at=now,
            updated_at=now,
        )
        .on_conflict_do_nothing()
    )
    pk = conn.execute(
        select(studies.c.pk).where(studies.c.study_instance_uid == record.study_instance_uid)
    ).scalar_one()
    return int(pk)


def _series(db: Database, conn: Connection, record: InstanceRecord, study_pk: int) -> int:
    row = conn.execute(
        select(series.c.pk, series.c.study_pk).where(
            series.c.series_instance_uid == record.series_instance_uid
        )
    ).first()
    if row is None:
        conn.execute(
            db.insert(series)
            .values(study_pk=study_pk, number_of_instances=0, **_columns(QueryLevel.SERIES, record))
            .on_conflict_do_nothing()
        )
        row = conn.execute(
            select(series.c.pk, series.c.study_pk).where(
                series.c.series_instance_uid == record.series_instance_uid
            )
        ).one()
    if row.study_pk != study_pk:
        raise series_elsewhere(record.series_instance_uid)
    return int(row.pk)


def _refresh_study(conn: Connection, study_pk: int, now: datetime) -> None:
    """Recompute the study's counters and ModalitiesInStudy from its series."""
    # Lock the study row first (FOR NO KEY UPDATE, the lock the UPDATE below
    # takes anyway): a concurrent writer filing another series of this study
    # then waits for our commit, and its counts, read after the wait, include
    # ours. Without it, both count before either commits and one total is lost.
    conn.execute(
        select(studies.c.pk).where(studies.c.pk == study_pk).with_for_update(key_share=True)
    )
    counts = conn.execute(
        select(
            func.count(series.c.pk), func.coalesce(func.sum(series.c.number_of_instances), 0)
        ).where(series.c.study_pk == study_pk)
    ).one()
    modalities = sorted(
        {
            m
            for (m,) in conn.execute(
                select(series.c.modality).where(series.c.study_pk == study_pk).distinct()
            )
            if m
        }
    )
    conn.execute(
        update(studies)
        .where(studies.c.pk == study_pk)
        .values(
            number_of_series=counts[0],
            number_of_instances=counts[1],
            modalities_in_study=("\\" + "\\".join(modalities) + "\\") if modalities else None,
            updated_at=now,
        )
    )


def _delete_instance_rows(conn: Connection, pks: list[int]) -> None:
    affected = conn.execute(
        select(instances.c.series_pk, func.count())
        .where(instances.c.pk.in_(pks))
        .group_by(instances.c.series_pk)
    ).all()
    conn.execute(delete(instances).where(instances.c.pk.in_(pks)))
    for series_pk, n in affected:
        conn.execute(
            update(series)
            .where(series.c.pk == series_pk)
            .values(number_of_instances=series.c.number_of_instances - n)
        )


_RETRIEVE_COLUMNS = (
    studies.c.study_instance_uid,
    series.c.series_instance_uid,
    instances.c.sop_instance_uid,
    instances.c.sop_class_uid,
    instances.c.transfer_syntax_uid,
    instances.c.blob_key,
    instances.c.size,
    instances.c.pixel_layout,
    instances.c.number_of_frames,
)


def _stored(row: Any) -> StoredInstance:
    return StoredInstance(
        study_instance_uid=row.study_instance_uid,
        series_instance_uid=row.series_instance_uid,
        sop_instance_uid=row.sop_instance_uid,
        sop_class_uid=row.sop_class_uid,
        transfer_syntax_uid=row.transfer_syntax_uid,
        blob_key=row.blob_key,
        size=row.size,
        layout=PixelLayout.from_bytes(row.pixel_layout) if row.pixel_layout else None,
        number_of_frames=row.number_of_frames or 1,
    )


def _scoped(stmt: Any, study: str, series_uid: str | None, sop: str | None) -> Any:
    stmt = stmt.where(studies.c.study_instance_uid == study)
    if series_uid is not None:
        stmt = stmt.where(series.c.series_instance_uid == series_uid)
    if sop is not None:
        stmt = stmt.where(instances.c.sop_instance_uid == sop)
    return stmt


def _joined(*columns: Any) -> Any:
    return (
        select(*columns)
        .select_from(instances)
        .join(series, series.c.pk == instances.c.series_pk)
        .join(studies, studies.c.pk == instances.c.study_pk)
    )


def find(
    conn: Connection, study: str, series_uid: str | None = None, sop: str | None = None
) -> list[StoredInstance]:
    """Instances in a study / series / one instance, in series and instance order.

    Raises NotFound when nothing matches.
    """
    stmt = _scoped(_joined(*_RETRIEVE_COLUMNS), study, series_uid, sop).order_by(
        series.c.series_number, series.c.pk, instances.c.instance_number, instances.c.pk
    )
    rows = conn.execute(stmt).all()
    if not rows:
        raise NotFound(_what(study, series_uid, sop) + " not found")
    return [_stored(r) for r in rows]


def metadata(
    conn: Connection, study: str, series_uid: str | None = None, sop: str | None = None
) -> list[bytes]:
    """The cached DICOM JSON of each instance in scope (raises NotFound when none)."""
    stmt = _scoped(_joined(instances.c.dicom_json), study, series_uid, sop).order_by(
        series.c.series_number, series.c.pk, instances.c.instance_number, instances.c.pk
    )
    rows = conn.execute(stmt).scalars().all()
    if not rows:
        raise NotFound(_what(study, series_uid, sop) + " not found")
    return [bytes(r) for r in rows]


def _what(study: str, series_uid: str | None, sop: str | None) -> str:
    if sop is not None:
        return f"instance {sop}"
    if series_uid is not None:
        return f"series {series_uid}"
    return f"study {study}"


def remove(
    conn: Connection, study: str, series_uid: str | None = None, sop: str | None = None
) -> list[str]:
    """Delete the rows in scope and empty parents; return the blob keys to remove."""
    rows = conn.execute(
        _scoped(
            _joined(instances.c.pk, instances.c.blob_key, instances.c.study_pk),
            study,
            series_uid,
            sop,
        )
    ).all()
    if not rows:
        raise NotFound(_what(study, series_uid, sop) + " not found")
    _delete_instance_rows(conn, [r.pk for r in rows])
    _prune(conn, {r.study_pk for r in rows}, datetime.now(UTC))
    return [r.blob_key for r in rows]


def _prune(conn: Connection, study_pks: set[int], now: datetime) -> None:
    """After instance rows went: drop empty series, refresh the studies' counters,
    drop studies left without series and patients left without studies."""
    conn.execute(
        delete(series).where(series.c.study_pk.in_(study_pks), series.c.number_of_instances <= 0)
    )
    for study_pk in study_pks:
        _refresh_study(conn, study_pk, now)
    patient_pks = list(
        conn.execute(select(studies.c.patient_pk).where(studies.c.pk.in_(study_pks))).scalars()
    )
    conn.execute(
        delete(studies).where(studies.c.pk.in_(study_pks), studies.c.number_of_series == 0)
    )
    still_used = select(studies.c.patient_pk).where(studies.c.patient_pk.in_(patient_pks))
    conn.execute(
        delete(patients).where(patients.c.pk.in_(patient_pks), patients.c.pk.notin_(still_used))
    )
