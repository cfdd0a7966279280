"""The CAP table as people read it: whole cells at any width from 80 columns, in a pipe, no markup eaten."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import install_plugin, run_cli

ANSI = re.compile(r"\x1b\[")


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> str:
    db = f"sqlite:///{tmp_path_factory.mktemp('report') / 'r.db'}"
    run_cli("run", "--backend", "torch_moe,llamacpp", "--num-requests", "8", "--warmup", "0", "--concurrency", "1,4",
            "--db", db, check=True)
    return db


@pytest.mark.parametrize("width", [80, 100, 120])
def test_compare_fits_the_width_with_every_cell_whole(stored: str, width: int) -> None:
    out = run_cli("compare", "--db", stored, env={"COLUMNS": str(width)}, check=True).stdout
    rows = json.loads(run_cli("compare", "--db", stored, "--json", check=True).stdout)
    assert not ANSI.search(out)  # a pipe gets no colour codes
    assert max(len(line) for line in out.splitlines()) <= width
    assert "…" not in out
    table_lines = [line for line in out.splitlines() if re.match(r"(torch_moe|llamacpp) +c=\d +bfloat16 ", line)]
    assert len(table_lines) == 4  # `compare | grep torch_moe` finds the rows
    for r in rows:
        line = next(li for li in table_lines if li.startswith(r["backend"] + " ") and f"c={r['concurrency']} " in li)
        for value in (f"{r['ttft_ms_p50']:.2f}", f"{r['tpot_ms_p50']:.2f}", f"{r['output_tok_per_s']:.1f}",
                      f"{r['accuracy']:.3f}"):
            assert value in line, (value, line)
    if width == 80:  # the full table needs more than 80 columns; what is left out is named
        assert "not shown at this width:" in out


def test_too_narrow_for_a_table_prints_one_block_per_row(stored: str) -> None:
    out = run_cli("compare", "--db", stored, env={"COLUMNS": "40"}, check=True).stdout
    assert max(len(line) for line in out.splitlines()) <= 40
    assert "torch_moe c=1" in out and re.search(r"^  TTFT +\d", out, re.M)


@pytest.mark.parametrize("fmt", ["rows", "csv", "json"])
def test_formats(stored: str, fmt: str) -> None:
    out = run_cli("compare", "--db", stored, "--format", fmt, check=True).stdout
    if fmt == "json":
        assert len(json.loads(out)) == 4
    elif fmt == "csv":
        assert out.splitlines()[0].startswith("run_id,") and len(out.splitlines()) == 5
    else:
        assert out.count("  S-MBU ") == 4 and "accuracy 95% CI" in out


def test_run_json_format_keeps_stdout_to_the_rows(tmp_path: Path) -> None:
    proc = run_cli("run", "--backend", "torch_moe", "--num-requests", "4", "--warmup", "0", "--concurrency", "1",
                   "--db", f"sqlite:///{tmp_path / 'r.db'}", "--format", "json", check=True)
    [row] = json.loads(proc.stdout)
    assert row["backend"] == "torch_moe" and "stored 1 run(s)" in proc.stderr


MARKUP = '''
    from contextlib import contextmanager
    from capbench_core import hookimpl
    from capbench_core.contract.backend import Availability, Backend

    class Marked(Backend):
        name = "marked"
        description = "a backend whose messages look like markup"
        def available(self):
            return Availability.yes()
        @contextmanager
        def start(self, model, hardware, options, shape):
            raise RuntimeError("[bold]boom[/] needs [vllm]")
            yield

    class Absent(Backend):
        name = "absent"
        def available(self):
            return Availability.no("needs pip install 'capbench[vllm]' on a [bold]GPU[/bold]")

    @hookimpl
    def register_backends(register):
        register.add_backend(Marked())
        register.add_backend(Absent())
'''


def test_strings_that_look_like_markup_print_literally(tmp_path: Path, tiny) -> None:  # type: ignore[no-untyped-def]
    model = tmp_path / "m[bold]x[vllm]"  # a path holds no "/", so [/] goes in the task name below
    shutil.copytree(tiny.path, model)
    env = install_plugin(tmp_path / "site", "capbench_marked", "capbench-marked", "1.0", MARKUP)
    db = f"sqlite:///{tmp_path / 'r.db'}"
    proc = run_cli("run", "--backend", "marked,torch_moe", "--model", str(model), "--num-requests", "2",
                   "--warmup", "0", "--concurrency", "1", "--db", db, env=env)
    assert proc.returncode == 3
    assert "m[bold]x[vllm]" in proc.stdout and "[bold]boom[/] needs [vllm]" in proc.stdout
    bad_task = run_cli("run", "--backend", "torch_moe", "--task", "x[bold]y[/]", "--db", db)
    assert "unknown task 'x[bold]y[/]'" in bad_task.stderr
    quick = {**env, "CAPBENCH_PLUGINS": "marked,torch_moe,tasks,hw"}
    default = run_cli("run", "--num-requests", "2", "--warmup", "0", "--concurrency", "1", "--db", db, env=quick)
    assert "absent (needs pip install 'capbench[vllm]' on a [bold]GPU[/bold])" in default.stdout


def test_a_pipe_gets_no_engine_noise_and_few_blank_lines(tmp_path: Path) -> None:
    proc = run_cli("run", "--backend", "llamacpp,torch_moe", "--num-requests", "4", "--warmup", "0",
                   "--concurrency", "1", "--db", f"sqlite:///{tmp_path / 'r.db'}", check=True)
    text = proc.stdout + proc.stderr
    assert "llama_" not in text and "n_ctx" not in text and not ANSI.search(text)
    assert sum(1 for line in proc.stdout.splitlines() if not line.strip()) <= 2


@pytest.mark.parametrize("width", [80, 120, 250])
def test_every_listing_prints_whole_at_any_width(width: int) -> None:
    """Listings (prices here; plugins, engines, models and studies print the same way) keep every cell
    whole: a compact table when it fits, else one block of `header value` lines per row."""
    out = run_cli("hardware", "prices", env={"COLUMNS": str(width)}, check=True).stdout
    rows = json.loads(run_cli("hardware", "prices", "--json", check=True).stdout)
    assert max(len(line) for line in out.splitlines()) <= width and "…" not in out
    lines = out.splitlines()
    for r in rows:
        [head] = [li for li in lines if li.split() and li.split()[0] == r["id"]]
        if width == 250:  # wide enough for the table: the row's cells on its line
            assert r["accelerator"] in head and r["as_of"] in head
        else:  # blocks: the row id heads its block, the date on a line of its own
            assert head.strip() == r["id"]
    assert sum(r["as_of"] in line for r in rows for line in lines) >= len(rows)


def test_progress_in_a_pipe_says_how_each_phase_ended() -> None:
    """A phase ended by an error or an interrupt never reads as done: an engine that died while starting
    says "failed after", an interrupted load level how far it got."""
    import io

    from rich.console import Console

    from capbench_core.measure import progress

    out = io.StringIO()
    reporter = progress.TerminalReporter(Console(file=out, force_terminal=False, width=120))
    with progress.using(reporter):
        with progress.waiting("vllm: starting the engine (log: /tmp/engine.log)"):
            pass
        with pytest.raises(RuntimeError), progress.waiting("sglang: starting the engine (log: /tmp/e.log)"):
            raise RuntimeError("engine exited with code 2 during start-up")
        tick = reporter.phase("torch_moe c=4", 10)
        for _ in range(3):
            tick()
        reporter.end_phase(failed=True)
    lines = out.getvalue().splitlines()
    assert lines[1].startswith("vllm: starting the engine: done in ")
    assert lines[3].startswith("sglang: starting the engine: failed after ")
    assert lines[5].startswith("torch_moe c=4: 3/10 done, stopped after ")
    assert not ANSI.search(out.getvalue())
