"""Share links on studies, their unlock tokens, and de-identified UID maps.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    op.create_table(
        "share_links",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("public_id", sa.String(length=16), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("creator", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("passcode_hash", sa.String(length=256), nullable=True),
        sa.Column("allow_download", sa.Boolean(), nullable=False),
        sa.Column("deidentify", sa.Boolean(), nullable=False),
        sa.Column("access", sa.String(length=16), nullable=False),
        sa.Column("uid_secret", sa.String(length=64), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("failure_window_start", sa.DateTime(timezone=True), nullable=True),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("public_id"),
        sa.UniqueConstraint("token_hash"),
    )
    op.create_index("ix_share_links_study", "share_links", ["study_instance_uid"])
    op.create_index("ix_share_links_creator", "share_links", ["creator"])
    op.create_table(
        "share_unlocks",
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("link_id", sa.Integer(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["link_id"], ["share_links.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("token_hash"),
    )
    op.create_index("ix_share_unlocks_link", "share_unlocks", ["link_id"])
    op.create_table(
        "share_uids",
        sa.Column("link_id", sa.Integer(), nullable=False),
        sa.Column("public_uid", sa.String(length=64), nullable=False),
        sa.Column("original_uid", sa.String(length=64), nullable=False),
        sa.Column("level", sa.String(length=8), nullable=False),
        sa.Column("withheld", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["link_id"], ["share_links.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("link_id", "public_uid"),
    )


def downgrade() -> None:
    op.drop_table("share_uids")
    op.drop_index("ix_share_unlocks_link", table_name="share_unlocks")
    op.drop_table("share_unlocks")
    op.drop_index("ix_share_links_creator", table_name="share_links")
    op.drop_index("ix_share_links_study", table_name="share_links")
    op.drop_table("share_links")
