"""`capbench model build-tiny`: rebuild the embedded tiny MoE from its recipe."""

from __future__ import annotations

from pathlib import Path

import click


def tiny_model_dir() -> Path:
    """Where the shipped tiny MoE lives (inside capbench_core/data)."""
    import capbench_core

    return Path(capbench_core.__file__).resolve().parent / "data" / "tiny-moe"


@click.command("build-tiny")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory to write config.json, model.safetensors and tokenizer.json to.")
@click.option("--steps", type=int, default=None, help="Training steps (default: the recipe's).")
@click.option("--seed", type=int, default=None, help="Seed (default: the recipe's).")
@click.option("--threads", type=int, default=None, help="torch threads (default: all cores).")
def build_tiny_command(out_dir: Path, steps: int | None, seed: int | None, threads: int | None) -> None:
    """Train the embedded tiny MoE on CPU (a few minutes) and save it in Hugging Face layout."""
    from dataclasses import replace

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from capbench_torch_moe.tiny import TinyRecipe, build

    recipe = TinyRecipe()
    recipe = replace(recipe, steps=steps or recipe.steps, seed=recipe.seed if seed is None else seed)
    with Progress(TextColumn("training tiny MoE"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn()) as bar:
        task = bar.add_task("train", total=recipe.steps, loss=float("nan"))
        report = build(out_dir, recipe, threads=threads,
                       progress=lambda step, total, loss: bar.update(task, completed=step, loss=loss))
    click.echo(f"wrote {out_dir}: held-out exact match {report['held_out_exact_match']:.3f} "
               f"on {report['held_out_problems']} problems, trained in {report['train_seconds']} s")
