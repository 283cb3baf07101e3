"""Retention, deletion and usage: the deletion audit, store deletions still pending,
the bytes a job holds and when its outputs expired, the render path of each chunk.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 12:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "deletions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("subject", sa.String(64), nullable=False),
        sa.Column("command", sa.String(64), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("objects", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("pending", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_deletions_subject", "deletions", ["subject"])
    op.create_table(
        "pending_deletions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "deletion_id",
            sa.Integer(),
            sa.ForeignKey("deletions.id", ondelete="SET NULL"),
            nullable=True,
        ),
        sa.Column("prefix", sa.String(512), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_pending_deletions_deletion_id", "pending_deletions", ["deletion_id"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("bytes_stored", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("expired_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("chunks") as batch:
        batch.add_column(sa.Column("device", sa.String(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("chunks") as batch:
        batch.drop_column("device")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("expired_at")
        batch.drop_column("bytes_stored")
    op.drop_index("ix_pending_deletions_deletion_id", "pending_deletions")
    op.drop_table("pending_deletions")
    op.drop_index("ix_deletions_subject", "deletions")
    op.drop_table("deletions")
