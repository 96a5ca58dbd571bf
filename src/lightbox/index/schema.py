"""Tables of the index (SQLAlchemy Core). Migrations live in ``migrations/``.

Patient attributes are copied onto each study row so that the common
study-level search is a single-table query.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    func,
)

from lightbox.dicom.attributes import Attribute, Kind, QueryLevel, at_level

metadata = MetaData()


@overload
def as_utc(value: datetime) -> datetime: ...
@overload
def as_utc(value: None) -> None: ...
def as_utc(value: datetime | None) -> datetime | None:
    """A timestamp read back from the index, in UTC: SQLite hands back naive
    datetimes (they were written as UTC), PostgreSQL aware ones."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _columns(level: QueryLevel) -> list[Column[object]]:
    return [_column(a) for a in at_level(level) if a.kind is not Kind.COUNT]


def _column(a: Attribute) -> Column[object]:
    if a.kind is Kind.INTEGER:
        return Column(a.column, Integer, nullable=True)
    return Column(a.column, String(a.length), nullable=True)


users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("password_hash", String(256), nullable=True),
    Column("is_admin", Boolean, nullable=False, default=False),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("email", String(254), nullable=True, unique=True),
    Column("organisation_id", Integer, nullable=False, default=1),
)

tokens = Table(
    "tokens",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("label", String(128), nullable=True),
    Column("scope", Text, nullable=True),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked", Boolean, nullable=False, default=False),
)

patients = Table(
    "patients",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("identity", String(512), nullable=False, unique=True),
    *_columns(QueryLevel.PATIENT),
)

studies = Table(
    "studies",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("patient_pk", Integer, ForeignKey("patients.pk"), nullable=False),
    *[_column(a) for a in at_level(QueryLevel.PATIENT)],
    *_columns(QueryLevel.STUDY),
    Column("patient_name_words", String(400), nullable=True),
    Column("number_of_series", Integer, nullable=False, default=0),
    Column("number_of_instances", Integer, nullable=False, default=0),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

series = Table(
    "series",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("study_pk", Integer, ForeignKey("studies.pk"), nullable=False),
    *_columns(QueryLevel.SERIES),
    Column("number_of_instances", Integer, nullable=False, default=0),
)

instances = Table(
    "instances",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("series_pk", Integer, ForeignKey("series.pk"), nullable=False),
    Column("study_pk", Integer, ForeignKey("studies.pk"), nullable=False),
    *_columns(QueryLevel.INSTANCE),
    Column("blob_key", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("pixel_layout", LargeBinary, nullable=True),
    Column("dicom_json", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

nodes = Table(
    "nodes",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("ae_title", String(16), nullable=False),
    Column("host", String(255), nullable=False),
    Column("port", Integer, nullable=False),
    Column("tls", Boolean, nullable=False, default=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("acts_as", String(128), nullable=True),
)

Index("ix_nodes_ae_title", nodes.c.ae_title)
Index("ix_studies_patient_id", studies.c.patient_id)
Index("ix_studies_patient_name", studies.c.patient_name)
Index("ix_studies_study_date", studies.c.study_date)
Index("ix_studies_accession_number", studies.c.accession_number)
Index("ix_studies_patient_pk", studies.c.patient_pk)
Index("ix_series_study_pk", series.c.study_pk)
Index("ix_instances_series_pk", instances.c.series_pk)
Index("ix_instances_study_pk", instances.c.study_pk)
Index("ix_tokens_user_id", tokens.c.user_id)
Index("ux_studies_study_instance_uid", studies.c.study_instance_uid, unique=True)
Index("ux_series_series_instance_uid", series.c.series_instance_uid, unique=True)
Index("ux_instances_sop_instance_uid", instances.c.sop_instance_uid, unique=True)

# The study browser's orders and name search (migration 0003).
Index("ix_studies_date_time", studies.c.study_date, studies.c.study_time)
Index("ix_studies_name_id_date", studies.c.patient_name, studies.c.patient_id, studies.c.study_date)
Index("ix_studies_id_date", studies.c.patient_id, studies.c.study_date)
Index("ix_studies_patient_name_nocase", studies.c.patient_name.collate("NOCASE")).ddl_if(
    dialect="sqlite"
)
Index(
    "ix_studies_patient_name_upper",
    func.upper(studies.c.patient_name).label("patient_name_upper"),
    postgresql_ops={"patient_name_upper": "text_pattern_ops"},
).ddl_if(dialect="postgresql")
