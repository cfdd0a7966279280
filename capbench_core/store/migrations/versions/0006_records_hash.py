"""runs: the hash of each run's raw request records, so that a replay under a fresh run id is recognised

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05

Existing rows are back-filled from their stored JSON. A database that already holds replays keeps them all
(nothing is deleted); later imports of the same records are refused.
"""
from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

from capbench_core.contract.records import records_hash

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("records_hash", sa.String(64), nullable=True))
        batch.create_index("ix_runs_records_hash", ["records_hash"])
    runs = sa.table("runs", sa.column("run_id", sa.String), sa.column("result_json", sa.Text),
                    sa.column("records_hash", sa.String))
    conn = op.get_bind()
    for run_id, text in conn.execute(sa.select(runs.c.run_id, runs.c.result_json)).all():
        requests = json.loads(text).get("requests") or []
        conn.execute(runs.update().where(runs.c.run_id == run_id).values(records_hash=records_hash(requests)))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_index("ix_runs_records_hash")
        batch.drop_column("records_hash")
