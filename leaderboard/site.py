"""Build the static CAP leaderboard from the results database.

Layout of the site (relative links only, so it works from ``file://`` and any
static host; no CDN, no network)::

    index.html                 hardware groups: fingerprint, devices, runs, models
    sparsity.html              the newest sparsity study per machine (when one is stored)
    hw/<fingerprint>.html      one page per hardware fingerprint: per (model, task, workload)
                               a sortable table, a CAP radar per system, a throughput-latency chart
    runs/<run_id>.json         every run's raw RunResult
    assets/site.css, site.js   styles and the table sorter

Runs on different hardware never share a page, a table or a chart. The build
writes into a temporary directory beside ``out`` and swaps it in at the end, so
a build that fails or is interrupted leaves the previous site as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from capbench_core import __version__
from capbench_core.analytics.grouping import group_runs, run_load
from capbench_core.contract.records import RunResult
from capbench_core.errors import CapbenchError
from capbench_leaderboard import charts

HERE = Path(__file__).resolve().parent


@dataclass
class Section:
    """One comparable set: same hardware, model, task and workload."""

    model: str
    task: str
    workload: str
    runs: list[RunResult]
    anchor: str
    radar: charts.Radar | None = None
    scatter: charts.Scatter | None = None
    routing: list[charts.Heatmap] = field(default_factory=list)

    def filters(self) -> list[tuple[str, list[str]]]:
        """The table's filters: each column a reader may narrow it by, with the values present."""
        values = {"backend": {r.backend for r in self.runs}, "load": {run_load(r) for r in self.runs},
                  "dtype": {r.model.dtype for r in self.runs}}
        return [(name, sorted(found)) for name, found in values.items()]


@dataclass
class HardwareGroup:
    fingerprint: str
    label: str
    devices: list[str]
    runs: int
    models: list[str]
    backends: list[str]
    sections: list[Section] = field(default_factory=list)


def _devices(r: RunResult) -> list[str]:
    out = []
    for d in r.hardware.devices:
        memory = f", {d.memory_bytes / 2**30:.0f} GiB" if d.memory_bytes else ""
        out.append(f"{d.count} x {d.model} ({d.kind}{memory})")
    return out


def groups(results: Sequence[RunResult]) -> list[HardwareGroup]:
    """Hardware groups, each with its comparable sections, most runs first."""
    by_fp: dict[str, HardwareGroup] = {}
    for (fp, model, task, workload), runs in group_runs(results).items():
        runs = sorted(runs, key=lambda r: (r.backend, r.workload.rate_rps or 0, r.workload.concurrency))
        group = by_fp.get(fp)
        if group is None:
            group = by_fp[fp] = HardwareGroup(fp, runs[0].hardware.label(), _devices(runs[0]), 0, [], [])
        group.runs += len(runs)
        group.models = sorted({*group.models, model})
        group.backends = sorted({*group.backends, *(r.backend for r in runs)})
        section = Section(model, task, workload, runs, anchor=f"s{len(group.sections) + 1}")
        section.radar = charts.radar(runs)
        section.scatter = charts.pareto(runs)
        section.routing = _routing_maps(runs)
        group.sections.append(section)
    return sorted(by_fp.values(), key=lambda g: (-g.runs, g.fingerprint))


def _routing_maps(runs: Sequence[RunResult]) -> list[charts.Heatmap]:
    """Per backend that measured routing, the heatmap of its highest-load row."""
    best: dict[str, RunResult] = {}
    for r in runs:
        if r.routing is not None:
            best[r.backend] = r  # runs are sorted by load within a backend: the last is the highest
    return [m for m in (charts.heatmap(r) for r in best.values()) if m is not None]


def _env() -> Any:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _num
    env.filters["pct"] = lambda v: "—" if v is None else f"{v * 100:.1f} %"
    env.globals["load_label"] = run_load
    return env


def _num(value: float | None, spec: str = ".3g") -> str:
    return "—" if value is None else format(value, spec)


@dataclass(frozen=True)
class BuildSummary:
    out: Path
    groups: int
    runs: int


def build(results: Sequence[RunResult], out: Path, studies: Sequence[dict[str, Any]] = (),
          provenance: dict[str, dict[str, Any]] | None = None,
          placements: Sequence[dict[str, Any]] = ()) -> BuildSummary:
    """Render the site into ``out``, atomically (see the module docstring)."""
    out = out.resolve()
    if out.exists() and not (out / "site.json").exists() and any(out.iterdir()):
        raise CapbenchError(f"{out} exists and is not a capbench site (no site.json): give an empty or new "
                            f"directory to --out, so nothing else is replaced")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        hw_groups = groups(results)
        _render(tmp, hw_groups, results, _newest_per_machine(studies), provenance or {},
                _newest_placements(placements))
        _swap(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BuildSummary(out, len(hw_groups), len(results))


def _newest_per_machine(studies: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest sparsity study per machine, each with its batch sizes and a tok/s-vs-sparsity chart."""
    newest: dict[str, dict[str, Any]] = {}
    for st in sorted(studies, key=lambda s: s["created_at"], reverse=True):
        newest.setdefault(f"{st['hardware']}/{st['study'].get('held')}", st)
    shown = []
    for st in newest.values():
        study = st["study"]
        if "description" not in study:  # studies stored before families were described
            study["description"] = (f"{study.get('active_params', 0):.3g} active parameters held, "
                                    f"top-{study.get('top_k', '?')}")
        members = study["members"]
        batches = list(members[0]["by_batch"]) if members else []
        series = [(f"batch {b}", [(m["sparsity"], m["by_batch"][b]["tok_per_s"]) for m in members]) for b in batches]
        shown.append({**st, "batches": batches, "chart": charts.lines(series, "sparsity", "tokens/s")})
    return shown


def _newest_placements(studies: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest placement study per (model, machine, dtype)."""
    newest: dict[str, dict[str, Any]] = {}
    for st in sorted(studies, key=lambda s: s["created_at"], reverse=True):
        newest.setdefault(f"{st['study']['model']}/{st['hardware']}/{st['study']['dtype']}", st)
    return list(newest.values())


def submitted(p: dict[str, Any] | None) -> str:
    """Who a row comes from: measured here, or imported — by a trusted signer, a signed but untrusted key,
    or unsigned."""
    if not p or p.get("origin") != "import":
        return "measured here"
    if p.get("submitter"):
        return f"{p['submitter']} (signed)"
    return "signed, key not trusted" if p.get("signed_by") else "unsigned import"


def hardware_claim(p: dict[str, Any] | None) -> str:
    """What stands behind a row's hardware: measured where the site was built, or a submitter's statement."""
    if not p or p.get("origin") != "import":
        return "hardware measured where this site was built"
    if p.get("signed_by"):
        who = p.get("submitter") or "an untrusted key"
        return f"hardware as stated by {who} (key {str(p['signed_by'])[:8]}…)"
    return "hardware as stated by an unsigned submitter"


def _render(root: Path, hw_groups: list[HardwareGroup], results: Sequence[RunResult],
            studies: list[dict[str, Any]], provenance: dict[str, dict[str, Any]],
            placements: list[dict[str, Any]] | None = None) -> None:
    env = _env()
    built = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    pages = (["sparsity.html"] if studies else []) + (["placement.html"] if placements else [])
    common = {"built": built, "version": __version__, "extra_pages": pages,
              "submitted": lambda run_id: submitted(provenance.get(run_id)),
              "hardware_claim": lambda run_id: hardware_claim(provenance.get(run_id))}
    (root / "assets").mkdir()
    for asset in (HERE / "assets").iterdir():
        shutil.copyfile(asset, root / "assets" / asset.name)
    (root / "runs").mkdir()
    for r in results:
        (root / "runs" / f"{r.run_id}.json").write_text(r.model_dump_json(indent=1))
    (root / "hw").mkdir()
    (root / "index.html").write_text(env.get_template("index.html").render(groups=hw_groups, prefix="", **common))
    for group in hw_groups:
        page = env.get_template("group.html").render(group=group, prefix="../", **common)
        (root / "hw" / f"{group.fingerprint}.html").write_text(page)
    if studies:
        page = env.get_template("sparsity.html").render(studies=studies, run_ids={r.run_id for r in results},
                                                        prefix="", **common)
        (root / "sparsity.html").write_text(page)
    if placements:
        page = env.get_template("placement.html").render(studies=placements, prefix="", **common)
        (root / "placement.html").write_text(page)
    (root / "site.json").write_text(json.dumps(
        {"built": built, "capbench_version": __version__, "runs": len(results),
         "groups": [{"fingerprint": g.fingerprint, "runs": g.runs} for g in hw_groups]}, indent=1))


def _swap(new: Path, out: Path) -> None:
    """Replace ``out`` by ``new``; the old site stays whole until the final rename."""
    new.chmod(0o755)
    if not out.exists():
        os.rename(new, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / "site")
    os.rename(new, out)
    shutil.rmtree(old, ignore_errors=True)
