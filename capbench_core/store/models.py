"""SQLAlchemy tables: one row per run, indexed metric columns plus the full JSON."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Float, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class RunRow(Base):
    __tablename__ = "runs"

    run_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    content_hash: Mapped[str] = mapped_column(String(64), unique=True)
    schema_version: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    status: Mapped[str] = mapped_column(String(16))
    backend: Mapped[str] = mapped_column(String(64))
    engine_version: Mapped[str | None] = mapped_column(String(128))
    model: Mapped[str] = mapped_column(String(256))
    task: Mapped[str] = mapped_column(String(128))
    workload_hash: Mapped[str] = mapped_column(String(64))
    concurrency: Mapped[int] = mapped_column(Integer)
    hardware_fingerprint: Mapped[str] = mapped_column(String(64))
    ttft_ms_p50: Mapped[float | None] = mapped_column(Float)
    tpot_ms_p50: Mapped[float | None] = mapped_column(Float)
    output_tok_per_s: Mapped[float | None] = mapped_column(Float)
    accuracy: Mapped[float | None] = mapped_column(Float)
    s_mbu: Mapped[float | None] = mapped_column(Float)
    s_mfu: Mapped[float | None] = mapped_column(Float)
    cost_usd_per_mtok: Mapped[float | None] = mapped_column(Float)
    energy_j_per_output_token: Mapped[float | None] = mapped_column(Float)
    result_json: Mapped[str] = mapped_column(Text)
    capbench_version: Mapped[str] = mapped_column(String(32), server_default="unknown")
    rate_rps: Mapped[float | None] = mapped_column(Float)
    origin: Mapped[str] = mapped_column(String(16), server_default="local")
    imported_from: Mapped[str | None] = mapped_column(String(512))
    imported_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    submitter: Mapped[str | None] = mapped_column(String(128))  # the trusted name of the signing key
    signed_by: Mapped[str | None] = mapped_column(String(64))   # public key whose signature checked
    records_hash: Mapped[str | None] = mapped_column(String(64))  # RunResult.records_hash(): replays are refused

    __table_args__ = (
        Index("ix_runs_group", "hardware_fingerprint", "model", "task"),
        Index("ix_runs_started_at", "started_at"),
        Index("ix_runs_records_hash", "records_hash"),
    )


class SubmitterRow(Base):
    """A trusted submitter: the public key a leaderboard accepts signed bundles from, by name."""

    __tablename__ = "submitters"

    public_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    added_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class StudyRow(Base):
    """An analysis built on runs (``kind`` = "sparsity"): its parameters and rows as JSON."""

    __tablename__ = "studies"

    study_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    hardware: Mapped[str] = mapped_column(String(256))
    hardware_fingerprint: Mapped[str | None] = mapped_column(String(64))
    capbench_version: Mapped[str] = mapped_column(String(32))
    study_json: Mapped[str] = mapped_column(Text)

    __table_args__ = (Index("ix_studies_kind", "kind", "created_at"),)


class SweepCellRow(Base):
    """One cell of a sweep: its last outcome and the runs it stored (JSON list of run ids)."""

    __tablename__ = "sweep_cells"

    sweep: Mapped[str] = mapped_column(String(64), primary_key=True)
    cell_hash: Mapped[str] = mapped_column(String(16), primary_key=True)
    label: Mapped[str] = mapped_column(String(512))
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    run_ids: Mapped[str] = mapped_column(Text)
    executor: Mapped[str] = mapped_column(String(16))
    finished_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
