"""Plugin manager: loads plugins from the ``capbench`` entry point group and
offers typed registries. The runner talks to this facade, never to ``pm.hook``.

Environment controls:
  CAPBENCH_PLUGINS=a,b          load only these plugins (by entry point name)
  CAPBENCH_DISABLE_PLUGINS=x,y  skip these plugins
"""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib import metadata
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy

from capbench_core.contract import hookspecs
from capbench_core.contract.registries import (
    BackendRegistry,
    EngineRegistry,
    HardwareRegistry,
    ModelBuilder,
    ModelRegistry,
    PluginInfo,
    Registry,
    TaskRegistry,
)
from capbench_core.errors import CapbenchError

if TYPE_CHECKING:
    from capbench_core.contract.records import RunResult

__all__ = ["ENTRY_POINT_GROUP", "BackendRegistry", "EngineRegistry", "HardwareRegistry", "ModelBuilder",
           "ModelRegistry", "PluginInfo", "PluginManager", "Registry", "TaskRegistry", "get_plugin_manager"]

ENTRY_POINT_GROUP = "capbench"


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
                                f"Hook names and arguments are in capbench_core/contract/hookspecs.py") from None
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
