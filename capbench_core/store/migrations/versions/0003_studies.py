"""studies table: analyses built on runs (the sparsity study), with their parameters and rows as JSON

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("study_id", sa.String(36), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("hardware", sa.String(256), nullable=False),
        sa.Column("hardware_fingerprint", sa.String(64)),
        sa.Column("capbench_version", sa.String(32), nullable=False),
        sa.Column("study_json", sa.Text, nullable=False),
    )
    op.create_index("ix_studies_kind", "studies", ["kind", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_studies_kind", "studies")
    op.drop_table("studies")
