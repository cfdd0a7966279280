"""runs: provenance (capbench version, local or imported, from which bundle) and the arrival rate

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25

Existing rows are back-filled from their stored JSON, so nothing measured before
this revision is lost or left blank.
"""
from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("capbench_version", sa.String(32), nullable=False, server_default="unknown"))
        batch.add_column(sa.Column("rate_rps", sa.Float))
        batch.add_column(sa.Column("origin", sa.String(16), nullable=False, server_default="local"))
        batch.add_column(sa.Column("imported_from", sa.String(512)))
        batch.add_column(sa.Column("imported_at", sa.DateTime(timezone=True)))
    runs = sa.table("runs", sa.column("run_id", sa.String), sa.column("result_json", sa.Text),
                    sa.column("capbench_version", sa.String), sa.column("rate_rps", sa.Float))
    conn = op.get_bind()
    for run_id, text in conn.execute(sa.select(runs.c.run_id, runs.c.result_json)).all():
        doc = json.loads(text)
        conn.execute(runs.update().where(runs.c.run_id == run_id).values(
            capbench_version=str(doc.get("capbench_version", "unknown"))[:32],
            rate_rps=(doc.get("workload") or {}).get("rate_rps")))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        for column in ("imported_at", "imported_from", "origin", "rate_rps", "capbench_version"):
            batch.drop_column(column)
