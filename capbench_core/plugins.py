"""Plugin manager: loads plugins from the ``capbench`` entry point group and
offers typed registries. The runner talks to this facade, never to ``pm.hook``.

Environment controls:
  CAPBENCH_PLUGINS=a,b          load only these plugins (by entry point name)
  CAPBENCH_DISABLE_PLUGINS=x,y  skip these plugins
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import pluggy

from capbench_core import hookspecs
from capbench_core.errors import CapbenchError, find_name

if TYPE_CHECKING:
    from capbench_core.backend import Backend, ModelRef
    from capbench_core.engines import Recipe
    from capbench_core.results import Device, RunResult
    from capbench_core.workload import Task

ENTRY_POINT_GROUP = "capbench"
T = TypeVar("T")


@dataclass
class PluginInfo:
    """One loaded plugin: its name, where it comes from, what it registered."""

    name: str
    source: str
    registers: dict[str, list[str]] = field(default_factory=dict)


class Registry(Generic[T]):
    """Name -> item, remembering which plugin gave each; duplicates are errors."""

    def __init__(self, kind: str, manager: PluginManager):
        self.kind = kind
        self._manager = manager
        self._items: dict[str, T] = {}
        self._owner: dict[str, str] = {}

    def _add(self, name: str, item: T) -> None:
        plugin = self._manager.current_plugin
        if name in self._items:
            raise CapbenchError(
                f"{self.kind} '{name}' is registered twice: by plugin '{self._owner[name]}' and by "
                f"plugin '{plugin}'. Disable one with CAPBENCH_DISABLE_PLUGINS={plugin}")
        self._items[name] = item
        self._owner[name] = plugin
        self._manager.info(plugin).registers.setdefault(self.kind, []).append(name)

    def _require(self, item: Backend | Task | Recipe, base: type, kind: str, where: str) -> None:
        """A registered object must subclass the base class that declares the whole contract, and be named."""
        plugin = self._manager.current_plugin
        if not isinstance(item, base):
            raise CapbenchError(f"plugin '{plugin}' registered a {kind} ({type(item).__name__}) that does not "
                                f"subclass {where}: subclass it (docs/plugins.md)")
        if not item.name:
            raise CapbenchError(f"plugin '{plugin}' registered a {kind} ({type(item).__name__}) without a name")

    def get(self, name: str) -> T:
        """By name, forgivingly (case, punctuation, an unambiguous prefix); else "did you mean"."""
        return self._items[find_name(self.kind, name, self._items)]

    def names(self) -> list[str]:
        return list(self._items)

    def owner(self, name: str) -> str:
        return self._owner[name]

    def items(self) -> Iterable[tuple[str, T]]:
        return self._items.items()


class BackendRegistry(Registry["Backend"]):
    def add_backend(self, backend: Backend) -> None:
        from capbench_core.backend import Backend

        self._require(backend, Backend, "backend", "capbench_core.backend.Backend")
        self._add(backend.name, backend)


class TaskRegistry(Registry["Task"]):
    def add_task(self, task: Task) -> None:
        from capbench_core.workload import Task

        self._require(task, Task, "task", "capbench_core.workload.Task")
        self._add(task.name, task)

    def get(self, name: str) -> Task:
        """`family:variant` names (``lm-eval:gsm8k``) go to the family's ``variant(name)``."""
        family, sep, variant = name.partition(":")
        if sep and family in self.names():
            return super().get(family).variant(variant)
        return super().get(name)


class EngineRegistry(Registry["Recipe"]):
    def add_engine(self, recipe: Recipe) -> None:
        from capbench_core.engines import Recipe

        self._require(recipe, Recipe, "engine", "capbench_core.engines.Recipe")
        self._add(recipe.name, recipe)


class ModelRegistry(Registry["ModelRef"]):
    def add_model(self, model: ModelRef) -> None:
        self._add(model.name, model)


class HardwareRegistry(Registry[Callable[[], "list[Device]"]]):
    def add_probe(self, name: str, probe: Callable[[], list[Device]]) -> None:
        self._add(name, probe)


def _env_list(name: str) -> set[str] | None:
    raw = os.environ.get(name, "").strip()
    return {p.strip() for p in raw.split(",") if p.strip()} if raw else None


class PluginManager:
    """Loads plugins once and answers typed questions about them."""

    def __init__(self, load_entry_points: bool = True):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.current_plugin = "?"
        self.backends = BackendRegistry("backend", self)
        self.tasks = TaskRegistry("task", self)
        self.models = ModelRegistry("model", self)
        self.hardware_probes = HardwareRegistry("hardware probe", self)
        self.engines = EngineRegistry("engine", self)
        self._collected = False
        if load_entry_points:
            self._load_entry_points()

    def info(self, plugin: str) -> PluginInfo:
        return self.plugins.setdefault(plugin, PluginInfo(plugin, "registered in code"))

    def register(self, plugin: ModuleType | object, name: str, source: str = "registered in code") -> None:
        """Add a plugin object; used for entry points and by tests."""
        if name in self.plugins and self.pm.get_plugin(name) is not None:
            raise CapbenchError(f"two plugins are named '{name}' ({self.plugins[name].source} and {source})")
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(name=name)
            raise CapbenchError(f"plugin '{name}' ({source}) does not match capbench's hooks: {exc}. "
                                f"Hook names and arguments are in capbench_core/hookspecs.py") from None
        self.plugins[name] = PluginInfo(name, source)
        self._collected = False

    def _load_entry_points(self) -> None:
        only = _env_list("CAPBENCH_PLUGINS")
        disabled = _env_list("CAPBENCH_DISABLE_PLUGINS") or set()
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if (only is not None and ep.name not in only) or ep.name in disabled:
                continue
            dist = ep.dist
            source = f"{dist.metadata['Name']} {dist.version}" if dist else "unknown package"
            if dist is not None and dist.metadata["Name"] == "capbench":
                source = f"built-in (capbench {dist.version})"
            try:
                module = ep.load()
            except Exception as exc:  # a broken third-party plugin must not break capbench
                raise CapbenchError(f"plugin '{ep.name}' ({ep.value}) failed to import: {exc}. "
                                    f"Disable it with CAPBENCH_DISABLE_PLUGINS={ep.name}") from exc
            self.register(module, ep.name, source)

    def _call_register_hooks(self) -> None:
        if self._collected:
            return
        self._collected = True
        for registry, hook in ((self.backends, "register_backends"), (self.tasks, "register_tasks"),
                               (self.models, "register_models"), (self.engines, "register_engines"),
                               (self.hardware_probes, "register_hardware_probes")):
            caller = getattr(self.pm.hook, hook)
            for impl in caller.get_hookimpls():
                self.current_plugin = impl.plugin_name
                impl.function(registry)
        self.current_plugin = "?"

    def collect(self) -> PluginManager:
        """Run every register_* hook (once); returns self for chaining."""
        self._call_register_hooks()
        return self

    def add_commands(self, cli: Any) -> None:
        self.pm.hook.register_commands(cli=cli)

    def notify_started(self, run: dict[str, Any]) -> list[str]:
        return self._notify(lambda: self.pm.hook.run_started(run=run))

    def notify_finished(self, result: RunResult) -> list[str]:
        return self._notify(lambda: self.pm.hook.run_finished(result=result))

    @staticmethod
    def _notify(call: Callable[[], Any]) -> list[str]:
        try:
            call()
        except Exception as exc:  # observers never change a run's outcome
            return [f"an observer plugin failed: {exc}"]
        return []


_DEFAULT: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide manager (tests build their own)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = PluginManager()
    return _DEFAULT.collect()
