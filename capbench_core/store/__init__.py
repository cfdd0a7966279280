"""The results store: SQLAlchemy on SQLite (default) or PostgreSQL, migrated by alembic.

URL resolution: ``--db URL`` > ``CAPBENCH_DB`` > a SQLite file in the user data
directory. Each save is one transaction; saving the same result twice is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session

from capbench_core.errors import CapbenchError
from capbench_core.results import RunResult
from capbench_core.store.models import RunRow

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def default_url() -> str:
    from platformdirs import user_data_dir

    env = os.environ.get("CAPBENCH_DB")
    if env:
        return env
    path = Path(user_data_dir("capbench")) / "capbench.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()


class Store:
    def __init__(self, url: str | None = None):
        self.url = url or default_url()
        try:
            self.engine = create_engine(self.url)
        except (ArgumentError, ImportError, ValueError) as exc:
            raise CapbenchError(f"cannot open database {self.url!r}: {exc}. Use sqlite:///PATH or "
                                f"postgresql+psycopg://user@host/db") from None
        if self.engine.dialect.name == "sqlite":
            _sqlite_pragmas(self.engine)
        self.migrate()

    def migrate(self) -> None:
        """Bring the schema to the newest alembic revision (no-op when current)."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        try:
            with self.engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        except OperationalError as exc:
            raise CapbenchError(f"cannot open database {self.url!r}: {exc.orig}") from None

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine) as s, s.begin():
            yield s

    def save(self, result: RunResult) -> bool:
        """Insert or update by run id; returns False when identical content was already stored."""
        digest = result.content_hash()
        m = result.metrics
        row = RunRow(
            run_id=result.run_id, content_hash=digest, schema_version=result.schema_version,
            started_at=result.started_at, status=result.status, backend=result.backend,
            engine_version=result.engine.version if result.engine else None, model=result.model.name,
            task=result.workload.task, workload_hash=result.workload.hash,
            concurrency=result.workload.concurrency, hardware_fingerprint=result.hardware.fingerprint,
            ttft_ms_p50=m.ttft_ms_p50, tpot_ms_p50=m.tpot_ms_p50, output_tok_per_s=m.output_tok_per_s,
            accuracy=m.accuracy, s_mbu=m.s_mbu, s_mfu=m.s_mfu, cost_usd_per_mtok=m.cost_usd_per_mtok,
            energy_j_per_output_token=m.energy_j_per_output_token, result_json=result.model_dump_json())
        with self.session() as s:
            if s.scalar(select(RunRow.run_id).where(RunRow.content_hash == digest)):
                return False
            s.merge(row)
        return True

    def runs(self, model: str | None = None, backend: str | None = None, task: str | None = None,
             limit: int | None = None) -> list[RunResult]:
        """Stored runs, newest first, optionally filtered."""
        query = select(RunRow.result_json).order_by(RunRow.started_at.desc())
        if model:
            query = query.where(RunRow.model == model)
        if backend:
            query = query.where(RunRow.backend == backend)
        if task:
            query = query.where(RunRow.task == task)
        if limit:
            query = query.limit(limit)
        with self.session() as s:
            return [RunResult.model_validate_json(text) for text in s.scalars(query)]

    def get(self, run_id: str) -> RunResult | None:
        with self.session() as s:
            text = s.scalar(select(RunRow.result_json).where(RunRow.run_id == run_id))
        return RunResult.model_validate_json(text) if text else None
