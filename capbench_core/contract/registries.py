"""The typed registries a plugin's ``register_*`` hook receives (tox-4 style): ``register.add_backend(...)``
records which plugin gave what, and a name registered twice is an error naming both plugins."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from capbench_core.errors import CapbenchError, find_name

if TYPE_CHECKING:
    from capbench_core.contract.backend import Backend, ModelRef
    from capbench_core.contract.engine_env import Recipe
    from capbench_core.contract.records import Device
    from capbench_core.contract.task import Task

T = TypeVar("T")


@dataclass
class PluginInfo:
    """One loaded plugin: its name, where it comes from, what it registered."""

    name: str
    source: str
    registers: dict[str, list[str]] = field(default_factory=dict)


class Owner(Protocol):
    """What a registry asks of the plugin manager that owns it: which plugin is registering now, and that
    plugin's record."""

    current_plugin: str

    def info(self, plugin: str) -> PluginInfo: ...


class Registry(Generic[T]):
    """Name -> item, remembering which plugin gave each; duplicates are errors."""

    def __init__(self, kind: str, manager: Owner):
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
        from capbench_core.contract.backend import Backend

        self._require(backend, Backend, "backend", "capbench_core.contract.backend.Backend")
        self._add(backend.name, backend)


class TaskRegistry(Registry["Task"]):
    def add_task(self, task: Task) -> None:
        from capbench_core.contract.task import Task

        self._require(task, Task, "task", "capbench_core.contract.task.Task")
        self._add(task.name, task)

    def get(self, name: str) -> Task:
        """`family:variant` names (``lm-eval:gsm8k``) go to the family's ``variant(name)``."""
        family, sep, variant = name.partition(":")
        if sep and family in self.names():
            return super().get(family).variant(variant)
        return super().get(name)


class EngineRegistry(Registry["Recipe"]):
    def add_engine(self, recipe: Recipe) -> None:
        from capbench_core.contract.engine_env import Recipe

        self._require(recipe, Recipe, "engine", "capbench_core.contract.engine_env.Recipe")
        self._add(recipe.name, recipe)


#: Writes a checkpoint of the given config (``config.json`` fields) with seeded random weights into the
#: directory, and returns it: models of any shape to measure serving speed on (the sparsity study).
ModelBuilder = Callable[[Mapping[str, Any], Path], Path]


class ModelRegistry(Registry["ModelRef"]):
    def __init__(self, kind: str, manager: Owner):
        super().__init__(kind, manager)
        self._builders: list[tuple[str, ModelBuilder]] = []

    def add_model(self, model: ModelRef) -> None:
        self._add(model.name, model)

    def add_builder(self, builder: ModelBuilder) -> None:
        """Register a random-init checkpoint builder (``builder(config, out_dir) -> checkpoint dir``)."""
        self._builders.append((self._manager.current_plugin, builder))
        self._manager.info(self._manager.current_plugin).registers.setdefault("model builder", []).append(
            getattr(builder, "__name__", "builder"))

    def builder(self) -> ModelBuilder:
        """The first registered model builder; an error saying which plugin provides one when none does."""
        if not self._builders:
            raise CapbenchError("no plugin registers a model builder: the torch_moe plugin does (it needs torch: "
                                "pip install torch==2.13.0, then capbench[torch])")
        return self._builders[0][1]

    def add_transient(self, model: ModelRef) -> None:
        """A model made while capbench runs (a study's random-init member), runnable by name in this process."""
        if self._items.get(model.name) == model:
            return
        self._items[model.name] = model
        self._owner[model.name] = "(made at run time)"


class HardwareRegistry(Registry[Callable[[], "list[Device]"]]):
    def add_probe(self, name: str, probe: Callable[[], list[Device]]) -> None:
        self._add(name, probe)
