"""The `capbench` command: one module per command group, each thin over the layers below
(docs/architecture.md). Plugins add commands through ``register_commands``."""

from __future__ import annotations

import sys
from collections.abc import MutableMapping

import click

from capbench_core.cli import admin, publish, results, run, studies  # noqa: F401  (they add their commands)
from capbench_core.cli.root import cli, plugin_manager
from capbench_core.errors import CapbenchError, find_name

__all__ = ["CommandRegistry", "cli", "main"]


class CommandRegistry:
    """What ``register_commands(cli)`` gets: add a command to the root or to one of its groups by name."""

    def __init__(self, root: click.Group):
        self.root = root

    def add_command(self, command: click.Command, group: str | None = None) -> None:
        """Add ``command`` to the root, or to the group ``group`` (``model``, ``study``, ...)."""
        if group is None:
            self.root.add_command(command)
            return
        groups = {name: c for name, c in self.root.commands.items() if isinstance(c, click.Group)}
        target = groups[find_name("command group", group, groups)]
        assert isinstance(target, click.Group)
        target.add_command(command)

    @property
    def commands(self) -> MutableMapping[str, click.Command]:
        """The root's commands (older plugins reached groups through it; prefer ``add_command(cmd, group)``)."""
        return self.root.commands


def main() -> None:
    try:
        plugin_manager().add_commands(CommandRegistry(cli))
    except CapbenchError as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(1)
    cli(prog_name="capbench")
