"""The layering of capbench_core, checked on the import graph: every import (top level, inside functions,
and under TYPE_CHECKING) goes to the same package or a lower layer, no import cycle, the core never imports a
plugin, no literal backend name in core logic, and no function past the size limits (docs/architecture.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT

CORE = ROOT / "capbench_core"
#: Lowest first. A module may import its own package and any package of a lower layer, never a sibling of
#: its own layer or anything above. ``capbench_core/__init__`` only re-exports ``hookimpl`` (contract).
LAYERS: list[tuple[str, ...]] = [
    ("errors",),
    ("contract",),
    ("analytics", "store"),
    ("config",),
    ("measure",),
    ("serving",),
    ("studies",),
    ("publish", "render"),
    ("cli", "testing", "backend", "results", "plugins", "engines", "openai_client"),
]
#: Thin re-export modules kept for third-party plugins for one release (deprecated).
COMPAT = ("backend", "results", "plugins", "engines", "openai_client")
PLUGIN_PACKAGES = ("capbench_torch_moe", "capbench_tasks", "capbench_hw", "capbench_llamacpp", "capbench_openai",
                   "capbench_vllm", "capbench_sglang", "capbench_leaderboard")
BUILT_IN_BACKENDS = {"torch_moe", "llamacpp", "llamacpp_server", "vllm", "sglang", "openai"}
#: Where an engine's name is a name of something else: peers' metric conventions (`compare --convention
#: vllm`) and the fake engine server plugin authors test against (`testing.py`, flavor="vllm").
NAME_ALLOWED = ("analytics/conventions.py", "testing.py")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in CORE.rglob("*.py")}


def _imports(path: Path, module: str) -> Iterator[str]:
    """Every module ``path`` imports, wherever the import statement is."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base
                                                                                                  else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(path, name) if m in modules and m != name} for name, path in modules.items()}


def _top(module: str) -> str:
    """The layer package of a module; the package's own ``__init__`` re-exports the contract's hookimpl."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "contract"


def _rank(module: str) -> int:
    top = _top(module)
    for rank, names in enumerate(LAYERS):
        if top in names:
            return rank
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS and docs/architecture.md")


def test_every_import_goes_down_the_layers() -> None:
    bad = []
    for module, targets in _graph().items():
        for target in targets:
            same_package = _top(module) == _top(target)
            if not same_package and _rank(target) >= _rank(module):
                bad.append(f"{module} -> {target}")
    assert not bad, "imports that go sideways or up the layers:\n" + "\n".join(sorted(bad))


def test_there_is_no_import_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_core_never_imports_a_plugin() -> None:
    bad = []
    for module, path in _modules().items():
        for target in _imports(path, module):
            if target.split(".")[0] in PLUGIN_PACKAGES:
                bad.append(f"{module} -> {target}")
    assert not bad, "the core imports plugins:\n" + "\n".join(sorted(set(bad)))


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def test_no_backend_is_named_in_core_logic() -> None:
    """Behaviour differs by declared capability (docs/plugins.md), never by a backend's name."""
    bad = []
    for path in CORE.rglob("*.py"):
        rel = str(path.relative_to(CORE))
        if rel in NAME_ALLOWED:
            continue
        tree = ast.parse(path.read_text())
        skip = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and id(node) not in skip and node.value in BUILT_IN_BACKENDS:
                bad.append(f"capbench_core/{rel}:{node.lineno}: {node.value!r}")
    assert not bad, "backend names in core logic:\n" + "\n".join(bad)


def test_functions_stay_small() -> None:
    """No function in capbench_core takes more than 10 parameters or has a cyclomatic complexity above 15
    (ruff's PLR0913 and C901, configured in pyproject.toml)."""
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "capbench_core", "--select", "C901,PLR0913",
                           "--output-format", "concise"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("old", COMPAT)
def test_old_import_paths_still_work_and_say_where_to_go(old: str) -> None:
    """Third-party plugins written against the flat layout keep working for one release, with a warning."""
    code = (f"import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
            f"try:\n    import capbench_core.{old}\nexcept DeprecationWarning as w:\n    print(w)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and "deprecated" in proc.stdout and "capbench_core." in proc.stdout, \
        proc.stdout + proc.stderr
    names = {"backend": "Backend", "results": "RunResult", "plugins": "PluginManager", "engines": "Recipe",
             "openai_client": "OpenAISession"}
    proc = subprocess.run([sys.executable, "-W", "ignore::DeprecationWarning", "-c",
                           f"from capbench_core.{old} import {names[old]}; print({names[old]}.__name__)"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.stdout.strip() == names[old], proc.stderr
