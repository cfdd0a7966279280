"""runs table: one row per run, indexed metrics and the full RunResult JSON

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("run_id", sa.String(36), primary_key=True),
        sa.Column("content_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("schema_version", sa.Integer, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("backend", sa.String(64), nullable=False),
        sa.Column("engine_version", sa.String(128)),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("task", sa.String(128), nullable=False),
        sa.Column("workload_hash", sa.String(64), nullable=False),
        sa.Column("concurrency", sa.Integer, nullable=False),
        sa.Column("hardware_fingerprint", sa.String(64), nullable=False),
        sa.Column("ttft_ms_p50", sa.Float),
        sa.Column("tpot_ms_p50", sa.Float),
        sa.Column("output_tok_per_s", sa.Float),
        sa.Column("accuracy", sa.Float),
        sa.Column("s_mbu", sa.Float),
        sa.Column("s_mfu", sa.Float),
        sa.Column("cost_usd_per_mtok", sa.Float),
        sa.Column("energy_j_per_output_token", sa.Float),
        sa.Column("result_json", sa.Text, nullable=False),
    )
    op.create_index("ix_runs_group", "runs", ["hardware_fingerprint", "model", "task"])
    op.create_index("ix_runs_started_at", "runs", ["started_at"])


def downgrade() -> None:
    op.drop_index("ix_runs_started_at", "runs")
    op.drop_index("ix_runs_group", "runs")
    op.drop_table("runs")
