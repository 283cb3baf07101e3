"""Registered voices (`farm voice add`): the voices table (Piper models, espeak-ng languages).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 12:05:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "voices",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("language", sa.String(length=32), nullable=False),
        sa.Column("model_key", sa.String(length=512), nullable=True),
        sa.Column("config_key", sa.String(length=512), nullable=True),
        sa.Column("digest", sa.String(length=64), nullable=True),
        sa.Column("sample_rate", sa.Integer(), nullable=False),
        sa.Column("model_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("voices")
