"""Result bundles: what `capbench export` writes and `capbench db import` accepts.

A bundle is one JSON file::

    {"format": "capbench-results", "format_version": 1, "capbench_version": "0.1.0",
     "created_at": "...", "runs": [{"content_hash": "<sha256>", "result": {RunResult}}, ...]}

Import trusts nothing in it. A file is accepted only when every run in it passes,
in order: valid JSON; the bundle's shape; a signature that checks, when there is one;
a result schema version this capbench knows; the JSON Schema in schemas/; the result
model; no negative, NaN or infinite metric; a hardware fingerprint that matches the
hardware spec it comes with; a content hash that matches the result; strings that
fit the database columns; and every aggregate re-derived from the run's own raw
records, nothing impossible (``capbench_core.publish.verify``). A rejected file changes
nothing; accepted runs are added once (by run id and content hash), so importing a
file twice adds nothing. With ``require_signature`` only bundles signed by a
trusted key are taken (``capbench_core.publish.signing``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any

from capbench_core import __version__
from capbench_core.contract.records import SCHEMA_VERSION, RunResult
from capbench_core.errors import CapbenchError

FORMAT = "capbench-results"
FORMAT_VERSION = 1


class Rejected(CapbenchError):
    """A bundle that failed validation: the file, the field and the reason (several lines when several
    runs of the file do not re-derive)."""

    def __init__(self, path: str, where: str, reason: str):
        super().__init__(f"{path}: {where}: {reason}" if where else f"{path}: {reason}")
        self.path, self.where, self.reason = path, where, reason


@dataclass
class Bundle:
    """A validated bundle: its runs and the public key that signed it (None: unsigned)."""

    results: list[RunResult]
    signed_by: str | None


def write(results: list[RunResult], out: Path, key: Any = None) -> None:
    """Write a bundle; with ``key`` (an ed25519 private key) it is signed."""
    from capbench_core.publish import signing

    doc: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "capbench_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "runs": [{"content_hash": r.content_hash(), "result": r.model_dump(mode="json")} for r in results]}
    if key is not None:
        doc = signing.sign(doc, key)
    out.write_text(json.dumps(doc, indent=1, allow_nan=False))


@cache
def _schema() -> dict[str, Any]:
    from capbench_schemas import SCHEMA_DIR

    data: dict[str, Any] = json.loads((SCHEMA_DIR / "run_result.schema.json").read_text())
    return data


@cache
def _column_limits() -> dict[str, int]:
    """Longest string each stored column takes (PostgreSQL enforces them; SQLite would not)."""
    from sqlalchemy import String

    from capbench_core.store.models import RunRow

    return {c.name: int(c.type.length) for c in RunRow.__table__.columns
            if isinstance(c.type, String) and c.type.length}


def _path(parts: Any) -> str:
    return ".".join(str(p) for p in parts) or "(top level)"


def _numbers(value: Any, where: tuple[Any, ...]) -> Iterator[tuple[str, float]]:
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield _path(where), float(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, (*where, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(item, (*where, i))


def _check_run(path: str, i: int, entry: Any) -> RunResult:
    """One entry of `runs`: every check of the module docstring, the first failure raised."""
    import jsonschema
    from pydantic import ValidationError

    from capbench_core.analytics.datasheets import fingerprint

    at = f"runs.{i}"
    if not isinstance(entry, dict) or not isinstance(entry.get("result"), dict):
        raise Rejected(path, at, "each run must be an object with 'content_hash' and 'result'")
    doc = entry["result"]
    version = doc.get("schema_version")
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise Rejected(path, f"{at}.result.schema_version",
                       f"schema version {version} is newer than this capbench reads ({SCHEMA_VERSION}): "
                       f"upgrade capbench to import it")
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(_schema()).iter_errors(doc))
    if error is not None:
        raise Rejected(path, f"{at}.result.{_path(error.absolute_path)}", error.message[:300])
    for where, number in [*_numbers(doc.get("metrics", {}), ("metrics",)),
                          *_numbers(doc.get("engine_metrics", {}), ("engine_metrics",))]:
        if not math.isfinite(number) or number < 0:
            raise Rejected(path, f"{at}.result.{where}", f"a metric must be a finite number >= 0, not {number}")
    try:
        result = RunResult.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise Rejected(path, f"{at}.result.{_path(first['loc'])}", first["msg"]) from None
    if not re.fullmatch(r"[0-9A-Za-z][0-9A-Za-z-]{0,35}", result.run_id):
        raise Rejected(path, f"{at}.result.run_id", "must be letters, digits and '-' (a UUID), at most 36")
    hw = result.hardware
    expected = fingerprint(hw.devices, hw.cpu_model, hw.host_memory_bytes)
    if hw.fingerprint != expected:
        raise Rejected(path, f"{at}.result.hardware.fingerprint",
                       f"{hw.fingerprint!r} does not match the hardware spec it comes with (which gives "
                       f"{expected!r}): the result was edited or made by a broken tool")
    if entry.get("content_hash") != result.content_hash():
        raise Rejected(path, f"{at}.content_hash", "does not match the result (the result was altered)")
    limits = _column_limits()
    for column, value in (("run_id", result.run_id), ("backend", result.backend), ("model", result.model.name),
                          ("task", result.workload.task), ("workload_hash", result.workload.hash),
                          ("engine_version", result.engine.version if result.engine else None),
                          ("capbench_version", result.capbench_version),
                          ("hardware_fingerprint", hw.fingerprint)):
        if value is not None and len(value) > limits[column]:
            raise Rejected(path, f"{at}.result ({column})",
                           f"{len(value)} characters; at most {limits[column]} are stored")
    return result


def read(path: Path, tasks: Any = None) -> Bundle:
    """Every run of a bundle file, validated and re-derived; raises Rejected on the first problem (for
    re-derivation: one line for each run that does not hold). ``tasks`` (name -> Task) lets accuracy be
    re-scored from the outputs."""
    from capbench_core.publish import signing, verify
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Rejected(name, "", "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise Rejected(name, "", f"cannot read it: {exc}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise Rejected(name, "", f"not valid JSON (truncated?): {exc.msg} at line {exc.lineno} "
                                 f"column {exc.colno}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise Rejected(name, "format", f"not a capbench result bundle (expected \"format\": \"{FORMAT}\"; "
                                       f"make one with `capbench export`)")
    if doc.get("format_version") != FORMAT_VERSION:
        raise Rejected(name, "format_version", f"{doc.get('format_version')!r} is not a bundle format this "
                                               f"capbench reads ({FORMAT_VERSION}): upgrade capbench")
    runs = doc.get("runs")
    if not isinstance(runs, list) or not runs:
        raise Rejected(name, "runs", "must be a non-empty list")
    try:
        signed_by = signing.signer(doc)
    except CapbenchError as exc:
        raise Rejected(name, "signature", str(exc)) from None
    results = [_check_run(name, i, entry) for i, entry in enumerate(runs)]
    lines = []
    for i, result in enumerate(results):
        findings = verify.check(result, tasks)
        if findings:
            lines.append(f"{name}: {findings[0].line(i)}")
    if lines:
        raise Rejected(name, "", "\n".join(lines).removeprefix(f"{name}: "))
    return Bundle(results, signed_by)


def _require_trusted(path: str, signed_by: str | None, trusted: dict[str, str]) -> None:
    if signed_by is None:
        raise Rejected(path, "signature", "unsigned: this leaderboard takes signed bundles only (the submitter "
                                          "signs with `capbench export --sign KEY`)")
    if signed_by not in trusted:
        raise Rejected(path, "signature", f"signed by {signed_by}, a key this leaderboard does not trust "
                                          f"(`capbench db trust {signed_by} --name NAME` to trust it)")


@dataclass
class ImportReport:
    added: int = 0
    duplicate: int = 0
    conflicts: list[str] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    files_ok: int = 0


def import_files(store: Any, paths: list[Path], tasks: Any = None, require_signature: bool = False) -> ImportReport:
    """Validate each file whole, then add its runs; a rejected file adds nothing. With
    ``require_signature``, only bundles signed by a key the store trusts are taken."""
    report = ImportReport()
    trusted = store.trusted()
    for path in paths:
        try:
            bundle = read(path, tasks)
            if require_signature:
                _require_trusted(str(path), bundle.signed_by, trusted)
        except Rejected as exc:
            report.rejected.append(exc)
            continue
        report.files_ok += 1
        for result in bundle.results:
            outcome = store.add_imported(result, str(path), bundle.signed_by, trusted.get(bundle.signed_by or ""))
            if outcome == "added":
                report.added += 1
            elif outcome == "duplicate":
                report.duplicate += 1
            else:
                report.conflicts.append(f"{path}: run {result.run_id} is stored with different content; "
                                        f"kept the stored one")
    return report
