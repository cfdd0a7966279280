"""sweep_cells table: which cells of a sweep ran, how they ended, and the runs they stored

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sweep_cells",
        sa.Column("sweep", sa.String(64), primary_key=True),
        sa.Column("cell_hash", sa.String(16), primary_key=True),
        sa.Column("label", sa.String(512), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("run_ids", sa.Text, nullable=False),
        sa.Column("executor", sa.String(16), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("sweep_cells")
