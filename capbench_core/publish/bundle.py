"""Result bundles: what `capbench export` writes and `capbench db import` accepts.

A bundle is one JSON file::

    {"format": "capbench-results", "format_version": 1, "capbench_version": "0.1.0",
     "created_at": "...", "runs": [{"content_hash": "<sha256>", "result": {RunResult}}, ...]}

Import trusts nothing in it. A file is accepted only when every run in it passes,
in order: a regular file within the size cap; valid JSON, nested at most 64 deep, with
no integer beyond 64 bits (``capbench_core.publish.limits``); the bundle's shape, a date
that is not in the future, at most the run cap; a signature that checks, when there is
one; a result schema version this capbench knows; the JSON Schema in schemas/; no
negative, NaN or infinite metric; no non-finite number anywhere, no negative one outside
free-form settings, names that are printable text; the result model; a hardware
fingerprint that matches the hardware spec it comes with; a content hash that matches
the result; strings and integers that fit the database columns; no two runs with the
same raw records; and every aggregate re-derived from the run's own raw records,
nothing impossible or inconsistent (``capbench_core.publish.verify``). A rejected file
changes nothing; accepted runs are added once (by run id and content hash), so
importing a file twice adds nothing, and a run whose raw records are stored under
another run id (a replay) rejects its file. Each stored run carries the verifier's list
of what it reports but nothing proves (``metrics.unverified``). With
``require_signature`` only bundles signed by a trusted key are taken
(``capbench_core.publish.signing``).
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
from capbench_core.errors import CapbenchError, printable
from capbench_core.publish import limits
from capbench_core.publish.bounds import CLOCK_SKEW, utc
from capbench_core.publish.findings import show

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
    """Write a bundle; with ``key`` (an ed25519 private key) it is signed. The file appears whole or not at all
    (written beside ``out``, then renamed); a directory that does not exist is an error, not created."""
    import os
    import tempfile

    from capbench_core.publish import signing

    if not out.parent.is_dir():
        raise CapbenchError(f"cannot write {out}: directory {out.parent} does not exist (create it first)")
    doc: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "capbench_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "runs": [{"content_hash": r.content_hash(), "result": r.model_dump(mode="json")} for r in results]}
    if key is not None:
        doc = signing.sign(doc, key)
    text = json.dumps(doc, indent=1, allow_nan=False)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, out)
    except OSError as exc:
        if "tmp" in locals():
            Path(tmp).unlink(missing_ok=True)
        raise CapbenchError(f"cannot write {out}: {exc.strerror}") from None


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


#: An INTEGER column holds 32 bits on PostgreSQL (SQLite's hold 64): the portable range.
INT32_MAX = 2**31 - 1


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
    for refused in limits.scan(doc):
        raise Rejected(path, f"{at}.result.{refused.where}", refused.reason)
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
    lengths = _column_limits()
    for column, value in (("run_id", result.run_id), ("backend", result.backend), ("model", result.model.name),
                          ("task", result.workload.task), ("workload_hash", result.workload.hash),
                          ("engine_version", result.engine.version if result.engine else None),
                          ("capbench_version", result.capbench_version),
                          ("hardware_fingerprint", hw.fingerprint)):
        if value is not None and len(value) > lengths[column]:
            raise Rejected(path, f"{at}.result ({column})",
                           f"{len(value)} characters; at most {lengths[column]} are stored")
    for where, number in (("schema_version", result.schema_version), ("workload.concurrency",
                                                                      result.workload.concurrency)):
        if not 0 <= number <= INT32_MAX:
            raise Rejected(path, f"{at}.result.{where}", f"{number} does not fit the database (0..{INT32_MAX})")
    return result


def _document(name: str, path: Path, caps: limits.Limits) -> dict[str, Any]:
    """The file as a bundle document: size, JSON, depth, shape, date and run count, each refused in one line."""
    try:
        doc = limits.load_json(limits.read_text(path, caps))
    except limits.Refused as exc:
        raise Rejected(name, exc.where, exc.reason) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise Rejected(name, "format", f"not a capbench result bundle (expected \"format\": \"{FORMAT}\"; "
                                       f"make one with `capbench export`)")
    if doc.get("format_version") != FORMAT_VERSION:
        raise Rejected(name, "format_version", f"{show(doc.get('format_version'))} is not a bundle format this "
                                               f"capbench reads ({FORMAT_VERSION}): upgrade capbench")
    created = doc.get("created_at")
    try:
        moment = datetime.fromisoformat(created) if isinstance(created, str) else None
    except ValueError:
        moment = None
    if created is not None and (moment is None or utc(moment) > datetime.now(timezone.utc) + CLOCK_SKEW):
        raise Rejected(name, "created_at", f"{show(created)} is not a date of the past")
    runs = doc.get("runs")
    if not isinstance(runs, list) or not runs:
        raise Rejected(name, "runs", "must be a non-empty list")
    if len(runs) > caps.max_runs:
        raise Rejected(name, "runs", f"{len(runs)} runs; a bundle holds at most {caps.max_runs} (a maintainer raises "
                                     f"it with --max-runs or CAPBENCH_MAX_BUNDLE_RUNS)")
    return doc


def _replays_within(name: str, results: list[RunResult]) -> None:
    """No two runs of one bundle with the same raw records (a run copied under fresh run ids)."""
    seen: dict[str, int] = {}
    for i, result in enumerate(results):
        key = result.records_hash()
        if key is not None and key in seen:
            raise Rejected(name, f"runs.{i}", f"the same raw request records as runs.{seen[key]} under another run "
                                              f"id (a replay)")
        if key is not None:
            seen[key] = i


def read(path: Path, tasks: Any = None, caps: limits.Limits | None = None) -> Bundle:
    """Every run of a bundle file, validated and re-derived; raises Rejected on the first problem (for
    re-derivation: one line for each run that does not hold). ``tasks`` (name -> Task) are the tasks installed
    here: a run of another task is refused. ``caps``: the size and run-count caps (default: ``Limits.of()``).
    The runs come back labelled with what they report but nothing proves (``metrics.unverified``)."""
    from capbench_core.publish import signing, verify
    name = printable(str(path))
    doc = _document(name, path, caps or limits.Limits.of())
    try:
        signed_by = signing.signer(doc)
    except CapbenchError as exc:
        raise Rejected(name, "signature", str(exc)) from None
    results = [_check_run(name, i, entry) for i, entry in enumerate(doc["runs"])]
    _replays_within(name, results)
    lines = []
    for i, result in enumerate(results):
        findings = verify.check(result, tasks)
        if findings:
            lines.append(f"{name}: {findings[0].line(i)}")
    if lines:
        raise Rejected(name, "", "\n".join(lines).removeprefix(f"{name}: "))
    for result in results:
        result.metrics.unverified = verify.unverified(result, tasks)
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


def read_all(paths: list[Path], tasks: Any = None, caps: limits.Limits | None = None,
             report: ImportReport | None = None) -> list[tuple[Path, Bundle]]:
    """Every file that passes ``read``, in order; the others go to ``report.rejected``. Needs no database."""
    report = report if report is not None else ImportReport()
    accepted = []
    for path in paths:
        try:
            accepted.append((path, read(path, tasks, caps)))
        except Rejected as exc:
            report.rejected.append(exc)
    return accepted


def add_all(store: Any, accepted: list[tuple[Path, Bundle]], report: ImportReport,
            require_signature: bool = False) -> ImportReport:
    """Add the runs of files ``read_all`` accepted, each file whole: one whose signature is not trusted (with
    ``require_signature``) or that replays runs the store holds under other ids adds nothing."""
    trusted = store.trusted()
    for path, bundle in accepted:
        name = printable(str(path))
        try:
            if require_signature:
                _require_trusted(name, bundle.signed_by, trusted)
            _no_replays(name, store, bundle.results)
        except Rejected as exc:
            report.rejected.append(exc)
            continue
        report.files_ok += 1
        for result in bundle.results:
            _add(store, report, name, result, bundle.signed_by, trusted)
    return report


def _no_replays(name: str, store: Any, results: list[RunResult]) -> None:
    for i, result in enumerate(results):
        stored = store.replays([result]).get(result.run_id)
        if stored is not None:
            raise Rejected(name, f"runs.{i}", f"the same raw request records as stored run {stored} under another "
                                              f"run id (a replay)")


def _add(store: Any, report: ImportReport, name: str, result: RunResult, signed_by: str | None,
         trusted: dict[str, str]) -> None:
    outcome = store.add_imported(result, name, signed_by, trusted.get(signed_by or ""))
    if outcome == "added":
        report.added += 1
    elif outcome == "duplicate":
        report.duplicate += 1
    elif outcome == "replay":
        report.conflicts.append(f"{name}: run {result.run_id} replays raw records stored under another run id; "
                                f"not added")
    else:
        report.conflicts.append(f"{name}: run {result.run_id} is stored with different content; kept the stored one")


def import_files(store: Any, paths: list[Path], tasks: Any = None, require_signature: bool = False,
                 caps: limits.Limits | None = None) -> ImportReport:
    """Validate each file whole, then add its runs; a rejected file adds nothing. With
    ``require_signature``, only bundles signed by a key the store trusts are taken."""
    report = ImportReport()
    return add_all(store, read_all(paths, tasks, caps, report), report, require_signature)
