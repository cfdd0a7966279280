from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from capbench_core.contract.registry import PluginManager

ROOT = Path(__file__).resolve().parent.parent
# Every process this test session starts inherits this mark, so the session can tell its own engine
# processes from anything else running on the machine (tests/engines.py).
SESSION_VAR = "CAPBENCH_TEST_SESSION"
os.environ.setdefault(SESSION_VAR, f"{os.getpid()}-{time.monotonic_ns()}")
CAPBENCH = shutil.which("capbench", path=str(Path(sys.executable).parent)) or "capbench"


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def pm() -> PluginManager:
    """A fresh plugin manager with the installed plugins, per test."""
    return PluginManager().collect()


@pytest.fixture
def tiny(pm: PluginManager):
    return pm.models.get("tiny-moe")


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'results.db'}"


def install_plugin(site: Path, module: str, dist: str, version: str, source: str) -> dict[str, str]:
    """Install a throwaway plugin distribution (module + dist-info with a `capbench` entry point) under
    ``site``; returns the environment that puts it on the path. Nothing in capbench changes."""
    import textwrap

    (site / module).mkdir(parents=True)
    (site / module / "__init__.py").write_text(textwrap.dedent(source))
    info = site / f"{module}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[capbench]\n{module.removeprefix('capbench_')} = {module}\n")
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def default_sigint() -> None:
    """For a child that a test signals: SIGINT back to its default. A shell without job control (a CI runner,
    nohup, a script in the background) starts children with SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler, so Ctrl-C from the test would be lost. Use as ``preexec_fn``."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600,
            check: bool = False) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    proc = subprocess.run([CAPBENCH, *args], capture_output=True, text=True, env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"capbench {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def missing(message: str) -> None:
    """A system dependency a test drives for real is absent: skip here, fail under CI (where setup installs it)."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """A real PostgreSQL server for this test session (see tests/postgres.py)."""
    from tests import postgres

    if postgres.bindir() is None:
        missing(f"PostgreSQL is not installed: {postgres.INSTALL_HINT}")
    with postgres.server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The store suite runs on both: a SQLite file, and a new database on a real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    from tests import postgres

    return postgres.new_database(request.getfixturevalue("pg_admin_url"))


@pytest.fixture(scope="session", autouse=True)
def no_engine_outlives_the_session() -> Iterator[None]:
    """Every test ends the processes it starts, children included; one left behind fails the session
    (and is killed, so it cannot slow down whatever runs next)."""
    import signal

    from tests.engines import engine_pids, wait_gone

    before = engine_pids()
    yield
    left = wait_gone(before, timeout_s=30)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"engine processes outlived the test session (killed now): {left}"


@pytest.fixture(scope="session")
def genuine_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    """12 real runs measured here (torch_moe and llamacpp, c = 1..6, priced, with an SLO): the genuine
    material bundles and forgeries are made from."""
    from capbench_core.store import Store

    db = f"sqlite:///{tmp_path_factory.mktemp('genuine') / 'runs.db'}"
    run_cli("run", "--backend", "torch_moe,llamacpp", "--num-requests", "6", "--warmup", "1", "--concurrency",
            "1,2,3,4,5,6", "--price-usd-per-hour", "1.25", "--slo", "ttft_ms=200,tpot_ms=50", "--db", db,
            check=True)
    return list(reversed(Store(db).runs()))
