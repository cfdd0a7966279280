"""Sweeps: a declarative benchmark matrix, expanded into cells, run locally or on a Ray cluster.

A matrix file (YAML or TOML, validated against schemas/sweep.schema.json) names
fixed settings and axes; their product is the set of cells. The fixed part is a
RunConfig (capbench_core/config.py: the same settings, names and defaults as
`capbench run`), each axis one of its fields. Each cell is a RunConfig with one
backend and one load level, with a stable content hash, so a sweep can be
resumed: cells whose hash is stored as complete are skipped. Results go to one database, written by this process only
(the Ray executor's workers send results back; they never write), so a worker
lost mid-cell leaves nothing half-written.

    name: cpu-smoke
    fixed: {model: tiny-moe, num_requests: 16, warmup: 2, task_options: {output_len: 8}}
    axes:
      backend: [torch_moe, llamacpp]
      concurrency: [1, 4]
      task: [arith, random]
    resources:                      # optional: what a backend's cells ask the cluster for
      vllm: {num_gpus: 1, accelerator: "H100 SXM"}
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from capbench_core.config import Level, RunConfig, describe_errors, resolve
from capbench_core.contract.registry import PluginManager
from capbench_core.errors import CapbenchError


class Axes(BaseModel):
    """Each axis lists the values to sweep; the cells are the product of all axes."""

    model_config = ConfigDict(extra="forbid")
    backend: list[str] | None = Field(default=None, min_length=1)
    model: list[str] | None = Field(default=None, min_length=1)
    task: list[str] | None = Field(default=None, min_length=1)
    concurrency: list[Annotated[int, Field(ge=1)]] | None = Field(default=None, min_length=1)
    rate: list[Annotated[float, Field(gt=0)]] | None = Field(default=None, min_length=1)
    num_requests: list[Annotated[int, Field(ge=1)]] | None = Field(default=None, min_length=1)
    backend_options: list[dict[str, str | int | float | bool]] | None = Field(default=None, min_length=1)
    task_options: list[dict[str, str | int | float | bool]] | None = Field(default=None, min_length=1)


class Resources(BaseModel):
    """What one cell of a backend needs from the cluster."""

    model_config = ConfigDict(extra="forbid")
    num_gpus: float = Field(default=0, ge=0)
    num_cpus: float = Field(default=1, gt=0)
    accelerator: str | None = Field(default=None, description="datasheet name; cells land on nodes that "
                                                               "advertise the custom resource 'accelerator:<name>'")


class SweepFile(BaseModel):
    """A benchmark matrix: fixed settings, axes, and per-backend resources."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[\w.-]{1,64}$")
    fixed: RunConfig = Field(default_factory=RunConfig, description="settings every cell shares: `capbench run`'s")
    axes: Axes
    resources: dict[str, Resources] = Field(default_factory=dict)


#: The settings a cell hash always covers (with their values, defaults included), in the cell's own form.
HASHED = ("concurrency", "num_requests", "warmup", "seed", "backend_options", "task_options")


@dataclass(frozen=True)
class Cell:
    """One run point; ``hash`` identifies it across resumes, machines and capbench versions."""

    config: RunConfig
    resources: Resources

    @property
    def backend(self) -> str:
        return self.config.backend[0]

    @property
    def level(self) -> Level:
        return self.config.levels()[0]

    @property
    def settings(self) -> dict[str, Any]:
        """The cell as one value per setting, in the form its hash covers (unchanged since sweeps began, so
        ``--resume`` knows cells stored by earlier versions): what the file gave, with scalars for the
        backend and the load level, and the values of ``HASHED`` whether given or default."""
        given = self.config.model_dump(mode="json", exclude_unset=True)
        full = self.config.model_dump(mode="json")
        out = {**given, "backend": self.backend}
        level = self.level
        if level.rate_rps:
            out["rate"] = level.rate_rps
            if "concurrency" in given:
                out["concurrency"] = level.concurrency
        else:
            out["concurrency"] = level.concurrency
        for key in HASHED:
            if key != "concurrency":
                out.setdefault(key, full[key])
        return out

    @property
    def hash(self) -> str:
        canonical = json.dumps(self.settings, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def label(self) -> str:
        return f"{self.backend} {self.config.model} {self.config.task or 'default task'} {self.level.label}"


@dataclass
class Matrix:
    path: Path
    spec: SweepFile
    cells: list[Cell]
    text: str = field(repr=False, default="")


def _line_of(text: str, key: str, value: Any = None) -> int | None:
    """1-based line of ``key`` (and, if given, the value) in the file, for error messages."""
    needle = re.compile(rf"(^|[\s{{,])['\"]?{re.escape(str(key))}['\"]?\s*[:=]")
    lines = text.splitlines()
    for i, line in enumerate(lines, 1):
        if needle.search(line) and (value is None or str(value) in line or not any(
                str(value) in later for later in lines[i:])):
            return i
    if value is not None:
        for i, line in enumerate(lines, 1):
            if re.search(rf"(^|[\s\[,'\"]){re.escape(str(value))}($|[\s\],'\"])", line):
                return i
    return None


def _where(path: Path, text: str, key: str, value: Any = None) -> str:
    line = _line_of(text, key, value)
    return f"{path}:{line}" if line else str(path)


def _parse(path: Path) -> tuple[dict[str, Any], str]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CapbenchError(f"no matrix file {path}") from None
    try:
        if path.suffix == ".toml":
            import tomllib

            doc: Any = tomllib.loads(text)
        else:
            import yaml

            doc = yaml.safe_load(text)
    except Exception as exc:  # yaml and toml raise their own error families
        raise CapbenchError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {exc}") from None
    if not isinstance(doc, dict):
        raise CapbenchError(f"{path}: a matrix file is a mapping with 'name', 'axes' and optional 'fixed', "
                            f"'resources'")
    return doc, text


def _schema() -> dict[str, Any]:
    from capbench_schemas import SCHEMA_DIR

    data: dict[str, Any] = json.loads((SCHEMA_DIR / "sweep.schema.json").read_text())
    return data


def load(path: Path, known: Mapping[str, list[str]]) -> Matrix:
    """Parse, validate against schemas/sweep.schema.json, check names against ``known`` (backend, model,
    task -> registered names), and expand into cells."""
    import jsonschema

    doc, text = _parse(path)
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(_schema()).iter_errors(doc))
    if error is not None:
        location = list(error.absolute_path)
        keys = [str(p) for p in location if isinstance(p, str)]
        key = keys[-1] if keys else ""
        if error.validator == "additionalProperties":
            bad = sorted(set(error.instance) - set(error.schema.get("properties", {})))
            allowed = ", ".join(sorted(error.schema.get("properties", {})))
            raise CapbenchError(f"{_where(path, text, bad[0] if bad else key)}: unknown "
                                f"{'axis' if location == ['axes'] else 'setting'} {bad[0] if bad else key!r}; "
                                f"allowed: {allowed}")
        value = error.instance if location and isinstance(location[-1], int) else None
        raise CapbenchError(f"{_where(path, text, key, value)}: "
                            f"{'.'.join(map(str, location)) or 'file'}: {error.message}")
    try:
        spec = SweepFile.model_validate(doc)
    except ValidationError as exc:
        raise CapbenchError(f"{path}: {describe_errors(exc)}") from None
    _check_names(path, text, spec, known)
    if not spec.fixed.backend and not spec.axes.backend:
        raise CapbenchError(f"{path}: every cell needs a backend: put it under 'fixed' or 'axes'")
    cells = list(_expand(spec))
    if not cells:
        raise CapbenchError(f"{path}: the matrix has no cells")
    return Matrix(path, spec, cells, text)


def _check_names(path: Path, text: str, spec: SweepFile, known: Mapping[str, list[str]]) -> None:
    for axis in ("backend", "model", "task"):
        values = list(getattr(spec.axes, axis) or [])
        fixed = getattr(spec.fixed, axis) if axis in spec.fixed.model_fields_set else None
        values += list(fixed) if isinstance(fixed, tuple) else [fixed] if fixed else []
        names = known.get(axis, [])
        for value in values:
            if axis == "model" and _is_checkpoint(path, text, value, spec.fixed.revision):
                continue
            if names and value not in names and not (axis == "task" and value.split(":")[0] in names):
                import difflib

                close = difflib.get_close_matches(value, names, n=1)
                hint = f" — did you mean {close[0]!r}?" if close else ""
                raise CapbenchError(f"{_where(path, text, axis, value)}: unknown {axis} {value!r}{hint} "
                                    f"Allowed: {', '.join(sorted(names))}")
    for backend in spec.resources:
        if known.get("backend") and backend not in known["backend"]:
            raise CapbenchError(f"{_where(path, text, backend)}: resources for unknown backend {backend!r}; "
                                f"allowed: {', '.join(sorted(known['backend']))}")


def _is_checkpoint(path: Path, text: str, value: str, revision: str | None) -> bool:
    """A model given as a path or a Hugging Face id (which must then be in the local cache)."""
    from capbench_core.analytics.checkpoint import HUB_ID, hub_snapshot

    if Path(value).expanduser().exists():
        return True
    if not HUB_ID.match(value):
        return False
    try:
        hub_snapshot(value, revision)
    except CapbenchError as exc:
        raise CapbenchError(f"{_where(path, text, 'model', value)}: {exc}") from None
    return True


def _expand(spec: SweepFile) -> Iterator[Cell]:
    """The product of the axes over the fixed settings, split into one cell per backend and load level."""
    fixed = spec.fixed.model_dump(exclude_unset=True)
    axes = spec.axes.model_dump(exclude_none=True)
    names = list(axes)
    for combo in itertools.product(*(axes[n] for n in names)):
        config = RunConfig.build({**fixed, **dict(zip(names, combo))})
        for backend in config.backend:
            for level in config.levels():
                cell = config.narrow(backend, level)
                yield Cell(cell, spec.resources.get(backend, Resources()))


# ---- running cells --------------------------------------------------------------------------------------------

CellStatus = Literal["complete", "failed"]


@dataclass
class CellOutcome:
    cell_hash: str
    status: CellStatus
    reason: str
    results: list[Any]  # RunResult


def run_cell(config: RunConfig, store: Any, hardware: Any, reporter: Any, pm: PluginManager) -> CellOutcome:
    """Run one cell in this process; results go to ``store`` (the driver's, or a worker's in-memory one)."""
    from capbench_core.measure.runner import Runner

    cell = Cell(config, Resources())
    try:
        results = Runner(pm, store, hardware, reporter).run(resolve(config, pm))
    except CapbenchError as exc:
        return CellOutcome(cell.hash, "failed", str(exc), [])
    bad = [r for r in results if r.status != "complete"]
    reason = "; ".join(f"{r.status}: {r.status_reason}" for r in bad)
    return CellOutcome(cell.hash, "failed" if bad else "complete", reason, results)


Progress = Callable[[Cell, CellOutcome], None]


def pending(matrix: Matrix, store: Any, resume: bool) -> list[Cell]:
    """The cells to run: all of them, or (--resume) those not stored as complete."""
    if not resume:
        return list(matrix.cells)
    done = {h for h, c in store.sweep_cells(matrix.spec.name).items() if c["status"] == "complete"}
    return [c for c in matrix.cells if c.hash not in done]


def run_local(matrix: Matrix, cells: list[Cell], store: Any, hardware: Any, reporter: Any, progress: Progress,
              pm: PluginManager) -> None:
    """One cell after another in this process; a failed cell is recorded with its reason and the sweep goes on.
    Ctrl-C stops the running cell (its run is stored as partial, the cell is not recorded) and re-raises."""
    for cell in cells:
        outcome = run_cell(cell.config, store, hardware, reporter, pm)
        store.record_cell(matrix.spec.name, cell.hash, cell.label(), outcome.status, outcome.reason,
                          outcome.results, "local")
        progress(cell, outcome)


def _ray_cell(settings: dict[str, Any]) -> dict[str, Any]:
    """Body of the Ray task: run the cell on the worker's own hardware into a throwaway in-memory store,
    and send the results back as JSON; only the driver writes to the shared database."""
    from capbench_core.contract.registry import PluginManager
    from capbench_core.measure.hardware import detect_hardware
    from capbench_core.measure.progress import Reporter
    from capbench_core.store import Store

    pm = PluginManager().collect()
    outcome = run_cell(RunConfig.build(settings), Store("sqlite://"), detect_hardware(pm), Reporter(), pm)
    return {"status": outcome.status, "reason": outcome.reason,
            "results": [r.model_dump_json() for r in outcome.results]}


def unsatisfiable(cells: list[Cell], nodes: list[dict[str, float]]) -> dict[str, str]:
    """cell hash -> why no node of the cluster can run it (GPU count or accelerator model)."""
    out = {}
    for cell in cells:
        need = cell.resources
        custom = f"accelerator:{need.accelerator}" if need.accelerator else None
        fits = [n for n in nodes if n.get("GPU", 0) >= need.num_gpus and n.get("CPU", 0) >= need.num_cpus
                and (custom is None or n.get(custom, 0) >= 1)]
        if not fits:
            want = [f"{need.num_gpus:g} GPU(s)"] if need.num_gpus else []
            want += [f"custom resource {custom!r}"] if custom else []
            want += [f"{need.num_cpus:g} CPU(s)"]
            out[cell.hash] = f"no node in the Ray cluster offers {' and '.join(want)}"
    return out


def run_ray(matrix: Matrix, cells: list[Cell], store: Any, address: str | None, progress: Progress,
            max_retries: int = 1, local_cpus: int | None = None) -> None:
    """Each cell is a Ray task asking for its resources; results stream back as tasks finish and are written
    here. A worker lost mid-cell is retried ``max_retries`` times, then recorded as failed."""
    try:
        import ray
    except ImportError:
        raise CapbenchError("the Ray executor needs Ray: pip install 'capbench[ray]'") from None
    from ray.exceptions import RayError

    started = not ray.is_initialized()
    if started:
        # with no address: a private Ray instance on loopback, gone when the sweep ends
        kwargs: dict[str, Any] = {"address": address} if address else {
            "num_cpus": local_cpus, "include_dashboard": False, "_node_ip_address": "127.0.0.1"}
        try:
            ray.init(**kwargs, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise CapbenchError(f"cannot reach the Ray cluster at {address or 'a new local one'}: {exc}") from None
    try:
        nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]
        skip = unsatisfiable(cells, nodes)
        for cell in cells:
            if cell.hash in skip:
                outcome = CellOutcome(cell.hash, "failed", skip[cell.hash], [])
                store.record_cell(matrix.spec.name, cell.hash, cell.label(), "failed", skip[cell.hash], [], "ray")
                progress(cell, outcome)
        remote = ray.remote(_ray_cell)
        refs = {}
        for cell in cells:
            if cell.hash in skip:
                continue
            need = cell.resources
            options: dict[str, Any] = {"num_cpus": need.num_cpus, "num_gpus": need.num_gpus,
                                       "max_retries": max_retries, "retry_exceptions": False}
            if need.accelerator:
                options["resources"] = {f"accelerator:{need.accelerator}": 1}
            refs[remote.options(**options).remote(cell.config.model_dump(mode="json", exclude_unset=True))] = cell
        try:
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1)
                cell = refs.pop(ready[0])
                try:
                    reply = ray.get(ready[0])
                    outcome = _from_reply(cell, reply)
                except RayError as exc:
                    outcome = CellOutcome(cell.hash, "failed", f"lost on the Ray cluster after {max_retries} "
                                                               f"retries: {type(exc).__name__}", [])
                store.record_cell(matrix.spec.name, cell.hash, cell.label(), outcome.status, outcome.reason,
                                  outcome.results, "ray")
                progress(cell, outcome)
        except KeyboardInterrupt:
            # On someone else's cluster our tasks are cancelled there. A private instance is shut down with
            # its workers instead: force-cancelling there races task replies still in flight, and Ray's core
            # aborts the driver on one ("An unexpected system state has occurred", task_manager.cc).
            if not started:
                for ref in refs:
                    ray.cancel(ref, force=True)
            raise
    finally:
        if started:
            ray.shutdown()


def _from_reply(cell: Cell, reply: dict[str, Any]) -> CellOutcome:
    from capbench_core.contract.records import RunResult

    results = [RunResult.model_validate_json(text) for text in reply["results"]]
    return CellOutcome(cell.hash, reply["status"], reply["reason"], results)
