"""The results store: SQLAlchemy on SQLite (default) or PostgreSQL, migrated by alembic.

URL resolution: ``--db URL`` > ``CAPBENCH_DB`` > a SQLite file in the user data
directory. Each save is one transaction; saving the same result twice is a no-op.
A database that is named (not the default) is created only when the caller says so
(``create=True``): a mistyped path must not become a new, empty database.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, func, select, text
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError
from sqlalchemy.orm import Session

from capbench_core import __version__
from capbench_core.contract.records import RunResult
from capbench_core.errors import CapbenchError
from capbench_core.store.models import RunRow, StudyRow, SubmitterRow, SweepCellRow

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


def as_url(db: str) -> str:
    """A database URL; a plain file path (`results.db`, `/tmp/x.db`) means that SQLite file."""
    if "://" in db:
        return db
    return f"sqlite:///{Path(db).expanduser().resolve()}"


class Store:
    def __init__(self, url: str | None = None, create: bool = True):
        """Open (and migrate) the database at ``url`` (None: the default one, created when missing). With
        ``create=False`` a named SQLite file must already be a capbench database; a server database must
        exist on its server (capbench creates only its tables)."""
        self.url = as_url(url or default_url())
        try:
            self.engine = create_engine(self.url)
        except (ArgumentError, ImportError, ValueError) as exc:
            raise CapbenchError(f"cannot open database {self.url!r}: {exc}. Use sqlite:///PATH or "
                                f"postgresql+psycopg://user@host/db") from None
        if self.engine.dialect.name == "sqlite":
            if url is not None and not create:
                _require_sqlite_store(self.engine.url.database)
            _sqlite_pragmas(self.engine)
        self.migrate()

    def migrate(self) -> None:
        """Bring the schema to the newest alembic revision (no-op when current).

        Several processes may open a new database at once (parallel runs, importers):
        PostgreSQL serialises them with an advisory lock, SQLite with a lock file beside
        the database, so exactly one of them creates the tables.
        """
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        try:
            with _migration_lock(self.engine), self.engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(4242010)"))
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        except (OperationalError, DBAPIError) as exc:
            raise CapbenchError(f"cannot open database {self.url!r}: {exc.orig}") from None
        except OSError as exc:
            raise CapbenchError(f"cannot open database {self.url!r}: {exc.strerror}: {exc.filename}") from None

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine) as s, s.begin():
            yield s

    def _insert(self) -> Any:
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(RunRow)
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(RunRow)

    def save(self, result: RunResult) -> bool:
        """Insert, or update the row of the same run id (a partial run completed); returns False when
        identical content was already stored. One statement, so concurrent writers cannot collide."""
        values = _row_values(result)
        stmt = self._insert().values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=[RunRow.run_id], set_={k: v for k, v in values.items() if k != "run_id"},
            where=RunRow.content_hash != stmt.excluded.content_hash)
        with self.session() as s:
            if s.scalar(select(RunRow.run_id).where(RunRow.content_hash == values["content_hash"])):
                return False
            return s.scalar(stmt.returning(RunRow.run_id)) is not None

    def add_imported(self, result: RunResult, source: str, signed_by: str | None = None,
                     submitter: str | None = None) -> str:
        """Store a submitted run unless it is there already: 'added'; 'duplicate' (the same run: the same
        content, the verifier's labels apart); 'conflict' (a different result under the same run id, which is
        kept as it was); or 'replay' (its raw records are stored under another run id: nothing is added)."""
        values = {**_row_values(result), "origin": "import", "imported_from": source[-512:],
                  "imported_at": datetime.now(timezone.utc), "signed_by": signed_by, "submitter": submitter}
        try:
            with self.session() as s:
                if self.engine.dialect.name == "postgresql":  # importers one at a time: a replay cannot race in
                    s.execute(text("SELECT pg_advisory_xact_lock(4242011)"))
                stmt = self._insert().values(**values).on_conflict_do_nothing().returning(RunRow.run_id)
                if s.scalar(stmt) is not None:
                    if values["records_hash"] and s.scalar(select(RunRow.run_id).where(
                            RunRow.records_hash == values["records_hash"], RunRow.run_id != result.run_id).limit(1)):
                        raise _Replay  # rolls the insert back
                    return "added"
                stored = s.scalar(select(RunRow.result_json).where(RunRow.run_id == result.run_id))
        except _Replay:
            return "replay"
        if stored is None or _unlabelled(RunResult.model_validate_json(stored)) == _unlabelled(result):
            return "duplicate"
        return "conflict"

    def replays(self, results: list[RunResult]) -> dict[str, str]:
        """run id -> the stored run, under another id, that holds the same raw records (a replay)."""
        hashes = {h: r.run_id for r in results if (h := r.records_hash())}
        if not hashes:
            return {}
        query = select(RunRow.run_id, RunRow.records_hash).where(RunRow.records_hash.in_(list(hashes)))
        with self.session() as s:
            rows = s.execute(query).all()
        return {hashes[h]: run_id for run_id, h in rows if h is not None and run_id != hashes[h]}

    def runs(self, model: str | None = None, backend: str | None = None, task: str | None = None,
             limit: int | None = None, hardware: str | None = None) -> list[RunResult]:
        """Stored runs, newest first, optionally filtered (``hardware``: a fingerprint or its prefix)."""
        query = select(RunRow.result_json).order_by(RunRow.started_at.desc(), RunRow.run_id)
        if hardware:
            query = query.where(RunRow.hardware_fingerprint.startswith(hardware, autoescape=True))
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

    def save_study(self, kind: str, hardware: str, fingerprint: str | None, study: dict[str, Any]) -> str:
        """Store one study (its parameters and rows, JSON-serialisable); returns its id."""
        study_id = str(uuid.uuid4())
        with self.session() as s:
            s.add(StudyRow(study_id=study_id, kind=kind, created_at=datetime.now(timezone.utc),
                           hardware=hardware[:256], hardware_fingerprint=fingerprint,
                           capbench_version=__version__, study_json=json.dumps(study, allow_nan=False)))
        return study_id

    def studies(self, kind: str) -> list[dict[str, Any]]:
        """Stored studies of one kind, newest first: {study_id, created_at, hardware, ..., study}."""
        query = select(StudyRow).where(StudyRow.kind == kind).order_by(StudyRow.created_at.desc())
        with self.session() as s:
            return [{"study_id": r.study_id, "created_at": r.created_at, "hardware": r.hardware,
                     "hardware_fingerprint": r.hardware_fingerprint, "capbench_version": r.capbench_version,
                     "study": json.loads(r.study_json)} for r in s.scalars(query)]

    def record_cell(self, sweep: str, cell_hash: str, label: str, status: str, reason: str,
                    results: list[RunResult], executor: str) -> None:
        """Store a finished cell's runs and its outcome in one transaction (a cell is never half-written)."""
        with self.session() as s:
            for result in results:
                values = _row_values(result)
                stmt = self._insert().values(**values)
                s.execute(stmt.on_conflict_do_update(
                    index_elements=[RunRow.run_id], set_={k: v for k, v in values.items() if k != "run_id"}))
            s.merge(SweepCellRow(sweep=sweep, cell_hash=cell_hash, label=label[:512], status=status, reason=reason,
                                 run_ids=json.dumps([r.run_id for r in results]), executor=executor,
                                 finished_at=datetime.now(timezone.utc)))

    def sweep_cells(self, sweep: str) -> dict[str, dict[str, Any]]:
        """cell hash -> {status, reason, label, run_ids, executor} for one sweep."""
        with self.session() as s:
            rows = s.scalars(select(SweepCellRow).where(SweepCellRow.sweep == sweep)).all()
            return {r.cell_hash: {"status": r.status, "reason": r.reason, "label": r.label,
                                  "run_ids": json.loads(r.run_ids), "executor": r.executor} for r in rows}

    def trust(self, public_key: str, name: str) -> None:
        """Trust bundles signed by ``public_key`` as coming from ``name`` (re-trusting renames)."""
        with self.session() as s:
            s.merge(SubmitterRow(public_key=public_key, name=name[:128], added_at=datetime.now(timezone.utc)))

    def trusted(self) -> dict[str, str]:
        """public key -> submitter name."""
        with self.session() as s:
            return {r.public_key: r.name for r in s.scalars(select(SubmitterRow))}

    def provenance(self) -> dict[str, dict[str, Any]]:
        """run id -> where it came from: origin (local | import), submitter name, signing key."""
        with self.session() as s:
            rows = s.execute(select(RunRow.run_id, RunRow.origin, RunRow.submitter, RunRow.signed_by)).all()
        return {r.run_id: {"origin": r.origin, "submitter": r.submitter, "signed_by": r.signed_by} for r in rows}

    def count(self) -> int:
        with self.session() as s:
            return int(s.scalar(select(func.count()).select_from(RunRow)) or 0)

    def get(self, run_id: str) -> RunResult | None:
        with self.session() as s:
            text = s.scalar(select(RunRow.result_json).where(RunRow.run_id == run_id))
        return RunResult.model_validate_json(text) if text else None


class _Replay(Exception):
    """Raised inside an import's transaction to roll it back."""


def _unlabelled(result: RunResult) -> RunResult:
    """The run without the verifier's labels, which an import adds: a run exported here and imported back is
    the same run."""
    copy = result.model_copy(deep=True)
    copy.metrics.unverified = {}
    return copy


def _require_sqlite_store(path: str | None) -> None:
    """A named SQLite database must exist and be capbench's; opening it read-only to look writes nothing."""
    import sqlite3

    if not path or path == ":memory:":
        return
    how = f"check --db (or CAPBENCH_DB), or create one with `capbench db init --db {path}`"
    if not Path(path).is_file():
        raise CapbenchError(f"no database at {path}: {how}")
    try:
        with closing(sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)) as conn:
            found = conn.execute("select name from sqlite_master where name = 'runs'").fetchone()
    except sqlite3.Error as exc:
        raise CapbenchError(f"{path} is not a capbench database ({exc}): {how}") from None
    if found is None:
        raise CapbenchError(f"{path} is not a capbench database (it has no runs table): {how}")


def _row_values(result: RunResult) -> dict[str, Any]:
    m, w = result.metrics, result.workload
    return dict(
        run_id=result.run_id, content_hash=result.content_hash(), records_hash=result.records_hash(),
        schema_version=result.schema_version,
        started_at=result.started_at, status=result.status, backend=result.backend,
        engine_version=result.engine.version if result.engine else None, model=result.model.name,
        task=w.task, workload_hash=w.hash, concurrency=w.concurrency, rate_rps=w.rate_rps,
        hardware_fingerprint=result.hardware.fingerprint, capbench_version=result.capbench_version[:32],
        ttft_ms_p50=m.ttft_ms_p50, tpot_ms_p50=m.tpot_ms_p50, output_tok_per_s=m.output_tok_per_s,
        accuracy=m.accuracy, s_mbu=m.s_mbu, s_mfu=m.s_mfu, cost_usd_per_mtok=m.cost_usd_per_mtok,
        energy_j_per_output_token=m.energy_j_per_output_token, result_json=result.model_dump_json())


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """An exclusive lock file beside a SQLite database while it migrates (no-op for other databases)."""
    path = engine.url.database if engine.dialect.name == "sqlite" else None
    if not path or path == ":memory:":
        yield
        return
    import fcntl

    with open(f"{path}.migrate-lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
