"""The SQL of the study browser: filtered, sorted, paged study lists with totals,
and the rows a study page shows.

Every list is one statement on the ``studies`` table (patient attributes are
copied there), so a page and its total stay index lookups at 100,000+ studies.
The indexes they lean on are added by migration 0003.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, and_, func, select

from lightbox.index.folders import folder_study_pks
from lightbox.index.schema import instances, series, studies


class SortKey(enum.Enum):
    """The orders a study list may be sorted in (a whitelist: nothing else reaches SQL)."""

    STUDY_DATE = "date"
    PATIENT_NAME = "name"
    PATIENT_ID = "id"


@dataclass(frozen=True)
class StudyFilter:
    """What a study list is narrowed to; None means "any".

    ``patient_name`` and ``accession_number`` and ``patient_id`` are DICOM
    patterns (``*`` any run, ``?`` one character); a name without wildcards
    matches as a prefix, case-insensitively. Dates are YYYYMMDD, inclusive.
    ``scope`` is the caller's reach, a subquery of study rows (None: every
    study); ``folder_id`` narrows the list to one folder.
    """

    patient_name: str | None = None
    patient_id: str | None = None
    accession_number: str | None = None
    date_from: str | None = None
    date_to: str | None = None
    modality: str | None = None
    scope: Select[Any] | None = None
    folder_id: int | None = None


@dataclass(frozen=True)
class StudyRow:
    """One study with its patient, as the list and the study page show it."""

    pk: int
    study_instance_uid: str
    patient_name: str | None
    patient_id: str | None
    patient_birth_date: str | None
    patient_sex: str | None
    study_date: str | None
    study_time: str | None
    study_description: str | None
    accession_number: str | None
    study_id: str | None
    referring_physician_name: str | None
    modalities_in_study: str | None
    number_of_series: int
    number_of_instances: int


@dataclass(frozen=True)
class SeriesRow:
    pk: int
    series_instance_uid: str
    series_number: int | None
    modality: str | None
    series_description: str | None
    body_part_examined: str | None
    series_date: str | None
    number_of_instances: int


@dataclass(frozen=True)
class InstanceRef:
    """An instance of a series, enough to name it and to render it."""

    pk: int
    sop_instance_uid: str
    instance_number: int | None
    number_of_frames: int
    blob_key: str
    has_pixels: bool


_STUDY_COLUMNS = (
    studies.c.pk,
    studies.c.study_instance_uid,
    studies.c.patient_name,
    studies.c.patient_id,
    studies.c.patient_birth_date,
    studies.c.patient_sex,
    studies.c.study_date,
    studies.c.study_time,
    studies.c.study_description,
    studies.c.accession_number,
    studies.c.study_id,
    studies.c.referring_physician_name,
    studies.c.modalities_in_study,
    studies.c.number_of_series,
    studies.c.number_of_instances,
)

# Every order ends in the primary key so that pages never overlap or skip rows;
# one direction throughout, so a single index serves both ways.
_ORDER = {
    SortKey.STUDY_DATE: (studies.c.study_date, studies.c.study_time, studies.c.pk),
    SortKey.PATIENT_NAME: (
        studies.c.patient_name, studies.c.patient_id, studies.c.study_date, studies.c.pk
    ),
    SortKey.PATIENT_ID: (studies.c.patient_id, studies.c.study_date, studies.c.pk),
}


def _like(value: str) -> str:
    """A DICOM pattern as a LIKE pattern with ``\\`` as escape."""
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _name_condition(conn: Connection, value: str) -> ColumnElement[bool]:
    """Case-insensitive name match that an index can answer when it starts with
    letters: SQLite's LIKE ignores ASCII case and uses the NOCASE index;
    PostgreSQL compares upper() with its text_pattern_ops expression index."""
    pattern = _like(value if ("*" in value or "?" in value) else value + "*")
    column = studies.c.patient_name
    if conn.dialect.name == "sqlite":
        return column.like(pattern, escape="\\")
    return func.upper(column).like(func.upper(pattern), escape="\\")


def _pattern_condition(conn: Connection, column: Any, value: str) -> ColumnElement[bool]:
    """Exact match (indexed), or a case-sensitive wildcard match."""
    if "*" not in value and "?" not in value:
        return column == value  # type: ignore[no-any-return]
    if conn.dialect.name == "sqlite":
        return column.op("GLOB", is_comparison=True)(value.replace("[", "[[]"))  # type: ignore[no-any-return]
    return column.like(_like(value), escape="\\")  # type: ignore[no-any-return]


def _conditions(conn: Connection, wanted: StudyFilter) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if wanted.patient_name:
        where.append(_name_condition(conn, wanted.patient_name))
    if wanted.patient_id:
        where.append(_pattern_condition(conn, studies.c.patient_id, wanted.patient_id))
    if wanted.accession_number:
        where.append(_pattern_condition(conn, studies.c.accession_number, wanted.accession_number))
    if wanted.date_from:
        where.append(studies.c.study_date >= wanted.date_from)
    if wanted.date_to:
        where.append(studies.c.study_date <= wanted.date_to)
    if wanted.modality:
        # Kept as \CT\MR\ (index.instances): a whole element, never a substring of one.
        where.append(
            studies.c.modalities_in_study.contains(f"\\{wanted.modality}\\", autoescape=True)
        )
    if wanted.scope is not None:
        where.append(studies.c.pk.in_(wanted.scope))
    if wanted.folder_id is not None:
        where.append(studies.c.pk.in_(folder_study_pks(wanted.folder_id)))
    return where


def _filtered(conn: Connection, stmt: Select[Any], wanted: StudyFilter) -> Select[Any]:
    conditions = _conditions(conn, wanted)
    return stmt.where(and_(*conditions)) if conditions else stmt


def list_statement(
    conn: Connection, wanted: StudyFilter, sort: SortKey, *, descending: bool, limit: int,
    offset: int,
) -> Select[Any]:
    """The SELECT behind :func:`list_studies` (exposed for EXPLAIN in tests)."""
    order = [c.desc() if descending else c.asc() for c in _ORDER[sort]]
    stmt = select(*_STUDY_COLUMNS).select_from(studies)
    return _filtered(conn, stmt, wanted).order_by(*order).limit(limit).offset(offset)


def list_studies(
    conn: Connection, wanted: StudyFilter, sort: SortKey, *, descending: bool, limit: int,
    offset: int,
) -> list[StudyRow]:
    """One page of studies matching ``wanted`` in the order asked for."""
    stmt = list_statement(conn, wanted, sort, descending=descending, limit=limit, offset=offset)
    return [StudyRow(**row._mapping) for row in conn.execute(stmt)]


def count_statement(conn: Connection, wanted: StudyFilter) -> Select[Any]:
    """The SELECT behind :func:`count_studies` (exposed for EXPLAIN in tests)."""
    return _filtered(conn, select(func.count()).select_from(studies), wanted)


def count_studies(conn: Connection, wanted: StudyFilter) -> int:
    """How many studies match ``wanted``."""
    return int(conn.execute(count_statement(conn, wanted)).scalar_one())


def study(conn: Connection, study_instance_uid: str) -> StudyRow | None:
    found = conn.execute(
        select(*_STUDY_COLUMNS).where(studies.c.study_instance_uid == study_instance_uid)
    ).first()
    return StudyRow(**found._mapping) if found is not None else None


_SERIES_COLUMNS = (
    series.c.pk,
    series.c.series_instance_uid,
    series.c.series_number,
    series.c.modality,
    series.c.series_description,
    series.c.body_part_examined,
    series.c.series_date,
    series.c.number_of_instances,
)


def series_of_study(conn: Connection, study_pk: int) -> list[SeriesRow]:
    """The study's series in series-number order."""
    stmt = (
        select(*_SERIES_COLUMNS)
        .where(series.c.study_pk == study_pk)
        .order_by(series.c.series_number, series.c.pk)
    )
    return [SeriesRow(**row._mapping) for row in conn.execute(stmt)]


def series_in_study(conn: Connection, study_instance_uid: str, series_uid: str) -> SeriesRow | None:
    """One series, only when it belongs to the named study."""
    stmt = (
        select(*_SERIES_COLUMNS)
        .join(studies, studies.c.pk == series.c.study_pk)
        .where(
            studies.c.study_instance_uid == study_instance_uid,
            series.c.series_instance_uid == series_uid,
        )
    )
    found = conn.execute(stmt).first()
    return SeriesRow(**found._mapping) if found is not None else None


def last_instance_pk(conn: Connection, series_pk: int) -> int:
    """The newest instance row of a series (changes whenever one is added or replaced)."""
    found = conn.execute(
        select(func.max(instances.c.pk)).where(instances.c.series_pk == series_pk)
    ).scalar()
    return int(found or 0)


def _instance_refs() -> Select[Any]:
    return select(
        instances.c.pk,
        instances.c.sop_instance_uid,
        instances.c.instance_number,
        instances.c.number_of_frames,
        instances.c.blob_key,
        instances.c.pixel_layout.is_not(None).label("has_pixels"),
    )


def _ref(row: Any) -> InstanceRef:
    return InstanceRef(
        pk=row.pk,
        sop_instance_uid=row.sop_instance_uid,
        instance_number=row.instance_number,
        number_of_frames=row.number_of_frames or 1,
        blob_key=row.blob_key,
        has_pixels=bool(row.has_pixels),
    )


def instances_of_series(
    conn: Connection, series_pk: int, *, limit: int, offset: int = 0
) -> list[InstanceRef]:
    """Up to ``limit`` instances of a series in instance-number order, from ``offset``."""
    stmt = (
        _instance_refs()
        .where(instances.c.series_pk == series_pk)
        .order_by(instances.c.instance_number, instances.c.pk)
        .limit(limit)
        .offset(offset)
    )
    return [_ref(row) for row in conn.execute(stmt)]


def instance_json(conn: Connection, series_pk: int, sop_instance_uid: str) -> bytes | None:
    """The cached DICOM JSON of one instance of the series."""
    found = conn.execute(
        select(instances.c.dicom_json).where(
            instances.c.series_pk == series_pk,
            instances.c.sop_instance_uid == sop_instance_uid,
        )
    ).scalar()
    return bytes(found) if found is not None else None
