"""Indexes for the study browser: sorted pages and case-insensitive name prefixes.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.create_index("ix_studies_date_time", "studies", ["study_date", "study_time"])
    op.create_index(
        "ix_studies_name_id_date", "studies", ["patient_name", "patient_id", "study_date"]
    )
    op.create_index("ix_studies_id_date", "studies", ["patient_id", "study_date"])
    # A case-insensitive prefix search needs an index in the same case rules as
    # the comparison: NOCASE for SQLite's LIKE, upper() for PostgreSQL, with
    # text_pattern_ops so LIKE 'ABC%' becomes an index range whatever the collation.
    if op.get_bind().dialect.name == "sqlite":
        op.execute(
            "CREATE INDEX ix_studies_patient_name_nocase ON studies (patient_name COLLATE NOCASE)"
        )
    else:
        op.execute(
            "CREATE INDEX ix_studies_patient_name_upper"
            " ON studies (upper(patient_name) text_pattern_ops)"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP INDEX ix_studies_patient_name_nocase")
    else:
        op.execute("DROP INDEX ix_studies_patient_name_upper")
    op.drop_index("ix_studies_id_date", table_name="studies")
    op.drop_index("ix_studies_name_id_date", table_name="studies")
    op.drop_index("ix_studies_date_time", table_name="studies")
