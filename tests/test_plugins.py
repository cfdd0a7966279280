"""Plugin core: entry point discovery, typed registries, collisions, env controls, hook docs."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest

from capbench_core import hookimpl
from capbench_core.contract import hookspecs
from capbench_core.contract.backend import OPTIONAL_CAPABILITIES, Availability, Backend, ModelRef, Session
from capbench_core.contract.registry import PluginManager
from capbench_core.errors import CapbenchError
from tests.conftest import ROOT, install_plugin, run_cli

BUILT_INS = {"torch_moe", "tasks", "hw"}


HELLO = '''
    from capbench_core import hookimpl
    from capbench_core.contract.backend import Availability, Backend

    class HelloBackend(Backend):
        name = "hello"
        description = "a third-party test backend"
        def available(self):
            return Availability.no("hello needs a device this machine does not have")
        def start(self, model, hardware, options):
            raise RuntimeError("unreachable")

    @hookimpl
    def register_backends(register):
        register.add_backend(HelloBackend())
'''


def test_external_plugin_is_discovered_through_its_entry_point(tmp_path: Path) -> None:
    env = install_plugin(tmp_path / "site", "capbench_hello", "capbench-hello", "0.3.1", HELLO)
    data = json.loads(run_cli("plugins", "--json", env=env, check=True).stdout)
    plugins = {p["name"]: p for p in data["plugins"]}
    assert plugins["hello"]["source"] == "capbench-hello 0.3.1"
    assert plugins["hello"]["registers"] == {"backend": ["hello"]}
    assert data["backends"]["hello"] == {"plugin": "hello", "available": False,
                                         "reason": "hello needs a device this machine does not have",
                                         "description": "a third-party test backend"}
    assert BUILT_INS <= set(plugins)


def test_builtins_say_where_they_come_from() -> None:
    data = json.loads(run_cli("plugins", "--json", check=True).stdout)
    for p in data["plugins"]:
        if p["name"] in BUILT_INS:
            assert p["source"].startswith("built-in (capbench ")
    assert data["backends"]["torch_moe"]["available"] is True
    human = run_cli("plugins", check=True).stdout
    assert "torch_moe" in human and "built-in" in human


def test_env_controls_select_and_disable_plugins() -> None:
    only = json.loads(run_cli("plugins", "--json", env={"CAPBENCH_PLUGINS": "tasks"}, check=True).stdout)
    assert [p["name"] for p in only["plugins"]] == ["tasks"]
    without = json.loads(run_cli("plugins", "--json", env={"CAPBENCH_DISABLE_PLUGINS": "torch_moe"},
                                 check=True).stdout)
    assert "torch_moe" not in {p["name"] for p in without["plugins"]}
    assert "torch_moe" not in without["backends"]


class _Backend(Backend):
    description = "inline"

    def __init__(self, name: str):
        self.name = name

    def available(self) -> Availability:
        return Availability.yes()

    def start(self, model, hardware, options):  # type: ignore[no-untyped-def]
        raise NotImplementedError


class _Plugin:
    def __init__(self, backend: str):
        self.backend = backend

    @hookimpl
    def register_backends(self, register) -> None:  # type: ignore[no-untyped-def]
        register.add_backend(_Backend(self.backend))


def test_name_collision_names_both_plugins() -> None:
    pm = PluginManager(load_entry_points=False)
    pm.register(_Plugin("dup"), "first")
    pm.register(_Plugin("dup"), "second")
    with pytest.raises(CapbenchError, match="registered twice: by plugin 'first' and by plugin 'second'"):
        pm.collect()


def test_collision_with_a_builtin_is_an_error_too() -> None:
    pm = PluginManager()
    pm.register(_Plugin("torch_moe"), "impostor")
    with pytest.raises(CapbenchError, match="by plugin 'torch_moe' and by plugin 'impostor'"):
        pm.collect()


def test_registry_rejects_a_backend_without_the_contract() -> None:
    class Broken:
        @hookimpl
        def register_backends(self, register) -> None:  # type: ignore[no-untyped-def]
            register.add_backend(object())

    pm = PluginManager(load_entry_points=False)
    pm.register(Broken(), "broken")
    with pytest.raises(CapbenchError, match="registered a backend .object. that does not subclass "
                                            "capbench_core.contract.backend.Backend"):
        pm.collect()


def test_registry_rejects_a_nameless_backend() -> None:
    class Nameless:
        @hookimpl
        def register_backends(self, register) -> None:  # type: ignore[no-untyped-def]
            register.add_backend(_Backend(""))

    pm = PluginManager(load_entry_points=False)
    pm.register(Nameless(), "nameless")
    with pytest.raises(CapbenchError, match="registered a backend .*without a name"):
        pm.collect()


def test_a_misspelt_hook_is_an_error_not_silence() -> None:
    class Misspelt:
        @hookimpl
        def register_backend(self, register) -> None:  # type: ignore[no-untyped-def]
            raise AssertionError("never called")

    pm = PluginManager(load_entry_points=False)
    with pytest.raises(CapbenchError, match="plugin 'misspelt' .*does not match capbench's hooks.*register_backend"):
        pm.register(Misspelt(), "misspelt")
    assert "misspelt" not in pm.plugins


def test_optional_capabilities_are_declared_and_documented() -> None:
    """Every optional capability the runner uses has a default on its base class and a line in docs/plugins.md."""
    from capbench_core.contract.task import Task

    docs = (ROOT / "docs" / "plugins.md").read_text()
    section = docs[docs.index("## Optional capabilities"):]
    section = section[:section.index("\n## ", 3)]
    classes = {"Backend": Backend, "Session": Session, "Task": Task}
    documented = set(re.findall(r"`(Backend|Session|Task)\.(\w+)[`(]", section))
    declared = {(c, m) for c, ms in OPTIONAL_CAPABILITIES.items() for m in ms}
    for cls_name, member in declared:
        assert hasattr(classes[cls_name], member), f"{cls_name}.{member} has no default"
    assert declared - documented == set(), "declared but not in docs/plugins.md"
    assert documented - declared == set(), "in docs/plugins.md but not declared"


def test_runner_and_cli_probe_no_capability_with_getattr() -> None:
    """The contract is explicit: no getattr/hasattr probing of backends, sessions or tasks."""
    for path in sorted((ROOT / "capbench_core").rglob("*.py")):
        module, text = path.relative_to(ROOT), path.read_text()
        probes = re.findall(r"(?:getattr|hasattr)\((?:backend|b|session|plan\.task|task)\b", text)
        assert not probes, f"{module} probes capabilities: {probes}"


def test_names_are_found_forgivingly_and_otherwise_suggested() -> None:
    pm = PluginManager().collect()
    assert pm.backends.get("torch_mo").name == "torch_moe"  # an unambiguous prefix
    assert pm.backends.get("TORCH-MOE").name == "torch_moe"  # case and punctuation
    assert pm.tasks.get("Arith").name == "arith"
    with pytest.raises(CapbenchError, match="unknown backend 'llama' — did you mean 'llamacpp' or 'llamacpp_server'"):
        pm.backends.get("llama")  # a prefix of two: both suggested, neither picked
    with pytest.raises(CapbenchError, match="unknown backend 'torch_moa' — did you mean 'torch_moe'"):
        pm.backends.get("torch_moa")
    with pytest.raises(CapbenchError, match="Available: arith, chat-sessions, gsm8k, lm-eval, mmlu, random, trace"):
        pm.tasks.get("gsm9k")


def test_a_prefix_may_skip_the_source_qualifier_of_a_price_row() -> None:
    from capbench_core.analytics.cost import price_row

    assert price_row("b200").id == "runpod:b200"  # the part after `runpod:`
    with pytest.raises(CapbenchError, match="did you mean 'runpod-secure:h100-sxm' or 'runpod:h100-pcie' or "
                                            "'runpod:h100-sxm'"):
        price_row("h100")


# --- every hook is documented and exercised by an inline plugin -------------------

HOOKS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
         if hasattr(fn, "capbench_spec")]


def test_every_hook_is_documented() -> None:
    docs = (ROOT / "docs" / "plugins.md").read_text()
    for name in HOOKS:
        assert f"`{name}" in docs, f"docs/plugins.md does not document {name}"
        assert inspect.getdoc(getattr(hookspecs, name)), f"{name} has no docstring"


def test_every_hook_is_called_with_an_inline_plugin(tmp_path: Path) -> None:
    import click

    from capbench_core.contract.records import RunResult

    calls: list[str] = []

    class Everything:
        @hookimpl
        def register_backends(self, register):  # type: ignore[no-untyped-def]
            calls.append("register_backends")
            register.add_backend(_Backend("inline"))

        @hookimpl
        def register_tasks(self, register):  # type: ignore[no-untyped-def]
            calls.append("register_tasks")

        @hookimpl
        def register_models(self, register):  # type: ignore[no-untyped-def]
            calls.append("register_models")
            register.add_model(ModelRef("m", tmp_path))

        @hookimpl
        def register_hardware_probes(self, register):  # type: ignore[no-untyped-def]
            calls.append("register_hardware_probes")
            register.add_probe("none", lambda: [])

        @hookimpl
        def register_engines(self, register):  # type: ignore[no-untyped-def]
            from capbench_core.contract.engine_env import Recipe

            class Inline(Recipe):
                name = "inline-engine"

            calls.append("register_engines")
            register.add_engine(Inline())

        @hookimpl
        def register_commands(self, cli):  # type: ignore[no-untyped-def]
            calls.append("register_commands")
            cli.add_command(click.Command("hello"))

        @hookimpl
        def run_started(self, run):  # type: ignore[no-untyped-def]
            calls.append("run_started")

        @hookimpl
        def run_finished(self, result):  # type: ignore[no-untyped-def]
            calls.append("run_finished")
            raise RuntimeError("observer bug")

    pm = PluginManager(load_entry_points=False)
    pm.register(Everything(), "everything")
    pm.collect()
    group = click.Group()
    pm.add_commands(group)
    assert pm.notify_started({"run_id": "x"}) == []
    warnings = pm.notify_finished(RunResult.model_construct())
    assert warnings == ["an observer plugin failed: observer bug"]
    assert sorted(calls) == sorted(HOOKS)
    assert "hello" in group.commands and pm.models.owner("m") == "everything"
    assert pm.engines.owner("inline-engine") == "everything"
