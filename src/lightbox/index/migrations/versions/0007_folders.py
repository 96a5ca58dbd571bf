"""Organisations, e-mail addresses, folders with collaborators, invitations, and
share links that remember their folder and organisation.

Revision ID: 0007
Revises: 0006
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    organisations = op.create_table(
        "organisations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.bulk_insert(organisations, [{"id": 1, "name": "default", "created_at": datetime.now(UTC)}])
    if op.get_bind().dialect.name == "postgresql":
        # The explicit id did not advance the serial: the next organisation would clash.
        op.execute("SELECT setval(pg_get_serial_sequence('organisations', 'id'), 1)")
    # Plain ADD COLUMN: rebuilding ``users`` on SQLite would cascade into its tokens.
    op.add_column("users", sa.Column("email", sa.String(length=254), nullable=True))
    op.create_index("ix_users_email", "users", ["email"], unique=True)
    op.add_column(
        "users",
        sa.Column("organisation_id", sa.Integer(), nullable=False, server_default="1"),
    )
    op.create_table(
        "folders",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("public_id", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("organisation_id", sa.Integer(), nullable=False),
        sa.Column("inbox_of", sa.Integer(), nullable=True),
        sa.Column("allow_download", sa.Boolean(), nullable=False),
        sa.Column("allow_reshare", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["organisation_id"], ["organisations.id"]),
        sa.ForeignKeyConstraint(["inbox_of"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("public_id"),
        sa.UniqueConstraint("inbox_of"),
    )
    op.create_table(
        "folder_members",
        sa.Column("folder_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["folder_id"], ["folders.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("folder_id", "user_id"),
    )
    op.create_index("ix_folder_members_user", "folder_members", ["user_id"])
    op.create_table(
        "folder_studies",
        sa.Column("folder_id", sa.Integer(), nullable=False),
        sa.Column("study_pk", sa.Integer(), nullable=False),
        sa.Column("added_by", sa.String(length=128), nullable=False),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["folder_id"], ["folders.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["study_pk"], ["studies.pk"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("folder_id", "study_pk"),
    )
    op.create_index("ix_folder_studies_study", "folder_studies", ["study_pk"])
    op.create_table(
        "folder_comments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("folder_id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("author", sa.String(length=128), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["folder_id"], ["folders.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_folder_comments_folder", "folder_comments", ["folder_id"])
    op.create_table(
        "invitations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("email", sa.String(length=254), nullable=False),
        sa.Column("organisation_id", sa.Integer(), nullable=False),
        sa.Column("folder_id", sa.Integer(), nullable=True),
        sa.Column("role", sa.String(length=16), nullable=True),
        sa.Column("invited_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("accepted_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["organisation_id"], ["organisations.id"]),
        sa.ForeignKeyConstraint(["folder_id"], ["folders.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_hash"),
    )
    # A node may act as a user: its C-FIND, C-MOVE and C-GET then see what they see.
    op.add_column("nodes", sa.Column("acts_as", sa.String(length=128), nullable=True))
    op.add_column("share_links", sa.Column("folder_id", sa.Integer(), nullable=True))
    op.add_column("share_links", sa.Column("organisation_id", sa.Integer(), nullable=True))
    # "signed-in" links were for any signed-in user; everyone was in one organisation.
    op.execute(
        "UPDATE share_links SET access = 'organisation', organisation_id = 1 "
        "WHERE access = 'signed-in'"
    )


def downgrade() -> None:
    with op.batch_alter_table("share_links") as batch:
        batch.drop_column("organisation_id")
        batch.drop_column("folder_id")
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("acts_as")
    op.drop_table("invitations")
    op.drop_index("ix_folder_comments_folder", table_name="folder_comments")
    op.drop_table("folder_comments")
    op.drop_index("ix_folder_studies_study", table_name="folder_studies")
    op.drop_table("folder_studies")
    op.drop_index("ix_folder_members_user", table_name="folder_members")
    op.drop_table("folder_members")
    op.drop_table("folders")
    op.drop_index("ix_users_email", table_name="users")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("organisation_id")
        batch.drop_column("email")
    op.drop_table("organisations")

