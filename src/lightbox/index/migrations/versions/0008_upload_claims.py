"""Upload claims: a member's new studies, between being offered and being filed
into their inbox (so that their parallel uploads of one study are theirs).

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"


def upgrade() -> None:
    op.create_table(
        "upload_claims",
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("study_instance_uid", "user_id"),
    )


def downgrade() -> None:
    op.drop_table("upload_claims")
