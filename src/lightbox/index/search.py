"""Running a Query against the index (the SQL half of QIDO-RS and C-FIND)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, and_, func, literal, or_, select

from lightbox.dicom.attributes import Attribute, Kind, QueryLevel, visible_at
from lightbox.dicom.query import Match, MatchType, Query
from lightbox.index.schema import instances, patients, series, studies

_TABLES = {
    QueryLevel.PATIENT: patients,
    QueryLevel.STUDY: studies,
    QueryLevel.SERIES: series,
    QueryLevel.INSTANCE: instances,
}


@dataclass(frozen=True)
class Hit:
    """One result row: attribute values by column, plus the pks to fetch more."""

    values: dict[str, Any]
    study_pk: int | None
    series_pk: int | None
    instance_pk: int | None


def _source(level: QueryLevel) -> tuple[Select[Any], dict[QueryLevel, Any]]:
    """The joined tables for a level, and which table holds each level's columns."""
    if level is QueryLevel.PATIENT:
        return select().select_from(patients), {QueryLevel.PATIENT: patients}
    if level is QueryLevel.STUDY:
        # Patient attributes are copied onto study rows.
        at_study: dict[QueryLevel, Any] = {QueryLevel.PATIENT: studies, QueryLevel.STUDY: studies}
        return select().select_from(studies), at_study
    joined = series.join(studies, studies.c.pk == series.c.study_pk)
    owners: dict[QueryLevel, Any] = {
        QueryLevel.PATIENT: studies,
        QueryLevel.STUDY: studies,
        QueryLevel.SERIES: series,
    }
    if level is QueryLevel.INSTANCE:
        joined = instances.join(series, series.c.pk == instances.c.series_pk).join(
            studies, studies.c.pk == instances.c.study_pk
        )
        owners[QueryLevel.INSTANCE] = instances
    return select().select_from(joined), owners


def _like(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _wildcard(column: ColumnElement[Any], pattern: str, sqlite: bool) -> ColumnElement[bool]:
    """Case-sensitive match of a DICOM wildcard pattern (``*`` and ``?``).

    SQLite's LIKE ignores ASCII case, PostgreSQL's does not; GLOB is SQLite's
    case-sensitive form, with ``[`` as its only other metacharacter.
    """
    if sqlite:
        return column.op("GLOB", is_comparison=True)(pattern.replace("[", "[[]"))
    return column.like(_like(pattern), escape="\\")


def _fuzzy_name(
    column: ColumnElement[Any], value: str, words: ColumnElement[Any] | None
) -> ColumnElement[bool]:
    """Any word of ``value`` starts a word of the name (case-insensitive).

    ``words`` is the name kept as " WORD WORD " (PatientName on study rows);
    other names are searched for a component start: the value's start, or
    after ^ (components), = (groups) or a space.
    """
    conditions = []
    for word in value.replace("^", " ").split():
        if words is not None:
            # Upper-cased in Python at ingest (index.instances.name_words), so here too.
            conditions.append(words.like(f"% {_like(word.upper())}%", escape="\\"))
        else:
            name, p = func.upper(column), _like(word)
            conditions += [
                name.like(func.upper(f"{lead}{p}%"), escape="\\") for lead in ("", "%^", "%=", "% ")
            ]
    return or_(*conditions) if conditions else literal(True)


def _condition(
    column: ColumnElement[Any], match: Match, words: ColumnElement[Any] | None, *, sqlite: bool
) -> ColumnElement[bool]:
    a = match.attribute
    if match.type is MatchType.RANGE:
        assert isinstance(match.value, tuple)
        low, high = match.value
        parts = []
        if low is not None:
            parts.append(column >= low)
        if high is not None:
            # A time bound includes every time that begins with it ("1030": to
            # 10:30:59.999999); a date bound is a whole day already.
            parts.append(column <= (high + "~" if a.kind is Kind.TIME else high))
        return and_(*parts)
    if match.type is MatchType.LIST and a.kind is Kind.MULTI:
        # Kept as \A\B\ (see index.instances): a wanted value must be one whole element.
        return or_(*[_wildcard(column, f"*\\{v}\\*", sqlite) for v in match.value])
    if match.type is MatchType.LIST:
        return column.in_(list(match.value))
    if match.type is MatchType.FUZZY:
        return _fuzzy_name(column, str(match.value), words)
    if match.type is MatchType.WILDCARD:
        if a.kind is Kind.PERSON_NAME:
            # Both sides upper-cased by the database: SQLite's upper() leaves non-ASCII
            # letters alone, so a Python-side upper would miss "Müller" there.
            return func.upper(column).like(func.upper(_like(str(match.value))), escape="\\")
        return _wildcard(column, str(match.value), sqlite)
    if a.kind is Kind.INTEGER:
        return column == int(str(match.value))
    if a.kind is Kind.PERSON_NAME:
        return func.upper(column) == func.upper(str(match.value))
    if a.kind is Kind.TIME:
        return column.like(_like(str(match.value)) + "%", escape="\\")
    return column == match.value


def _column(owners: dict[QueryLevel, Any], attribute: Attribute) -> Any:
    return owners[attribute.level].c[attribute.column]


def _filtered(
    conn: Connection, query: Query, scope_study_pks: Any | None
) -> tuple[Select[Any], dict[QueryLevel, Any]]:
    stmt, owners = _source(query.level)
    sqlite = conn.dialect.name == "sqlite"
    for match in query.matches:
        column = _column(owners, match.attribute)
        words = None
        if match.attribute.keyword == "PatientName" and QueryLevel.STUDY in owners:
            words = studies.c.patient_name_words
        condition = _condition(column, match, words, sqlite=sqlite)
        if match.attribute.keyword in query.unknown_matches:
            # Unknown values are kept as NULL (empty ones too: see dicom.instance).
            condition = or_(condition, column.is_(None))
        stmt = stmt.where(condition)
    if scope_study_pks is not None and query.level is QueryLevel.PATIENT:
        # A patient is visible through a study the caller may see, never on its own.
        visible = select(studies.c.patient_pk).where(studies.c.pk.in_(scope_study_pks))
        stmt = stmt.where(patients.c.pk.in_(visible))
    elif scope_study_pks is not None:
        stmt = stmt.where(studies.c.pk.in_(scope_study_pks))
    return stmt, owners


def search(
    conn: Connection, query: Query, *, limit: int, scope_study_pks: Any | None = None
) -> list[Hit]:
    """Rows matching ``query`` at its level, ordered newest study first.

    ``scope_study_pks`` (a subquery or list) restricts results to studies the
    caller may see; None means no restriction.
    """
    stmt, owners = _filtered(conn, query, scope_study_pks)
    attrs = visible_at(query.level)
    cols = [_column(owners, a).label(a.keyword) for a in attrs]
    table = _TABLES[query.level]
    keys = [table.c.pk.label("_pk")]
    if query.level in (QueryLevel.SERIES, QueryLevel.INSTANCE):
        keys += [studies.c.pk.label("_study"), series.c.pk.label("_series")]
    stmt = stmt.add_columns(*cols, *keys)
    stmt = stmt.order_by(*_ordering(query.level, owners)).limit(limit).offset(query.offset)
    hits = []
    for row in conn.execute(stmt):
        m = row._mapping
        values = {a.keyword: m[a.keyword] for a in attrs}
        pk = m["_pk"]
        hits.append(
            Hit(
                values=values,
                study_pk=pk if query.level is QueryLevel.STUDY else m.get("_study"),
                series_pk=pk if query.level is QueryLevel.SERIES else m.get("_series"),
                instance_pk=pk if query.level is QueryLevel.INSTANCE else None,
            )
        )
    return hits


def count(conn: Connection, query: Query, *, scope_study_pks: Any | None = None) -> int:
    """How many rows ``query`` matches (for totals in the study browser)."""
    stmt, _owners = _filtered(conn, query, scope_study_pks)
    return int(conn.execute(stmt.add_columns(func.count())).scalar_one())


def _ordering(level: QueryLevel, owners: dict[QueryLevel, Any]) -> list[Any]:
    if level is QueryLevel.PATIENT:
        return [patients.c.patient_name, patients.c.pk]
    if level is QueryLevel.STUDY:
        return [studies.c.study_date.desc(), studies.c.study_time.desc(), studies.c.pk.desc()]
    if level is QueryLevel.SERIES:
        return [studies.c.pk.desc(), series.c.series_number, series.c.pk]
    # The order WADO-RS retrieves in (index.instances.find): series by number, then images.
    return [series.c.series_number, series.c.pk, instances.c.instance_number, instances.c.pk]


def representative_json(conn: Connection, level: QueryLevel, pk: int) -> bytes | None:
    """The cached DICOM JSON of the first instance of a study / series / the instance."""
    where = {
        QueryLevel.STUDY: instances.c.study_pk == pk,
        QueryLevel.SERIES: instances.c.series_pk == pk,
        QueryLevel.INSTANCE: instances.c.pk == pk,
    }[level]
    found = conn.execute(
        select(instances.c.dicom_json).where(where).order_by(instances.c.pk).limit(1)
    ).scalar()
    return bytes(found) if found is not None else None
