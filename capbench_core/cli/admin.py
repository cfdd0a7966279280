"""What is installed and known here: `capbench plugins`, `engines`, `hardware` and `model`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from capbench_core.cli.root import (
    cli,
    duration,
    format_peak,
    install_progress,
    make_console,
    plain,
    plugin_manager,
    print_fit,
    progress_reporter,
)
from capbench_core.errors import CapbenchError


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """List plugins, where each comes from, what it registers, and backend availability."""
    pm = plugin_manager()
    backends = {}
    for name, backend in pm.backends.items():
        availability = backend.available()
        backends[name] = {"plugin": pm.backends.owner(name), "available": availability.ok,
                          "reason": availability.reason, "description": backend.description}
    listing = [{"name": p.name, "source": p.source, "registers": p.registers} for p in pm.plugins.values()]
    if as_json:
        options = {name: b.option_model().describe() for name, b in pm.backends.items()}
        click.echo(json.dumps({"plugins": listing, "backends": backends, "backend_options": options}, indent=2,
                              default=str))
        return
    from rich.table import Table
    from rich.text import Text

    console = make_console()
    table = Table(title="plugins", title_justify="left")
    for col in ("plugin", "source", "registers"):
        table.add_column(col)
    for p in listing:
        regs = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in p["registers"].items()) or "—"
        table.add_row(Text(p["name"]), Text(p["source"]), Text(regs))
    print_fit(console, table, wrap=("registers",))
    table = Table(title="backends", title_justify="left")
    for col in ("backend", "plugin", "available here", "why not"):
        table.add_column(col)
    for name, b in backends.items():
        table.add_row(Text(name), Text(b["plugin"]), "yes" if b["available"] else "no", Text(b["reason"] or ""))
    print_fit(console, table, wrap=("why not",))


@cli.group()
def model() -> None:
    """Model analytics and the embedded tiny MoE."""


@model.command("inspect")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the contract keys as JSON.")
@click.option("--context-len", type=click.IntRange(min=0), default=1024, show_default=True,
              help="Context length for flops_per_token.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32", "fp8"]), default="bfloat16",
              show_default=True, help="Element type for byte counts.")
@click.option("--revision", default=None, metavar="REF",
              help="With a Hugging Face id: the cached revision (a ref or a commit; default main).")
def inspect_model(name: str, as_json: bool, context_len: int, dtype: str, revision: str | None) -> None:
    """Parameters (total / active per token), sparsity, FLOPs and KV bytes of NAME.

    NAME is a registered model (see `capbench model list`), a model directory, a config.json, a .gguf file or a
    Hugging Face id in the local cache.
    """
    from capbench_core.analytics.checkpoint import model_ref
    from capbench_core.analytics.model_spec import spec_from_path

    ref = model_ref(plugin_manager(), name, revision)
    path = Path(name) if Path(name).is_file() else ref.path
    spec = spec_from_path(path, ref.name)
    if as_json:
        click.echo(json.dumps(spec.summary(context_len, dtype), indent=2))
        return
    from capbench_core.render.report import print_model

    print_model(make_console(), spec, spec.summary(context_len, dtype))


@model.command("list")
def list_models() -> None:
    """Registered models."""
    pm = plugin_manager()
    for name, ref in pm.models.items():
        click.echo(f"{name}\t{ref.description}\t{ref.path}")


@cli.group()
def engines() -> None:
    """Engine environments: vLLM, SGLang and llama.cpp each in their own virtualenv or build.

    \b
    capbench engines list              what is installed, with package, version, Python and device
    capbench engines install vllm      create engines/vllm under the user data directory
    capbench engines remove vllm
    """


def _recipes(names: tuple[str, ...]) -> list[Any]:
    pm = plugin_manager()
    return [pm.engines.get(n) for n in names] if names else [r for _, r in pm.engines.items()]


@engines.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def engines_list(as_json: bool) -> None:
    """Every engine capbench can install, and whether it is installed here."""
    from dataclasses import asdict

    from capbench_core.contract import engine_env
    from capbench_core.serving import environments

    rows = list(environments.listing(_recipes(()), environments.this_device()))
    if as_json:
        click.echo(json.dumps([asdict(r) for r in rows], indent=2))
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"engine environments ({engine_env.engines_dir()})"), title_justify="left")
    for col in ("engine", "package", "version", "device", "installed", "variant", "python / binary"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(*(Text(c) for c in (
            r.name, r.package, r.version or "—", r.device,
            "yes" if r.installed else f"no (about {r.estimate_min:g} min: capbench engines install {r.name})",
            r.variant or "—", r.executable or "—")))
    print_fit(make_console(), table)


@engines.command("install")
@click.argument("names", nargs=-1, required=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Build for this device (auto: cuda when an NVIDIA GPU is visible).")
@click.option("--force", is_flag=True, help="Reinstall even when the environment is installed.")
def engines_install(names: tuple[str, ...], device: str, force: bool) -> None:
    """Install engine environments (one virtualenv or build each, under the user data directory)."""
    from capbench_core.contract import engine_env
    from capbench_core.serving import environments

    target: Any = environments.this_device() if device == "auto" else device
    console = make_console()
    for recipe in _recipes(names):
        found = engine_env.installed(recipe.name)
        if found and not force:
            console.print(plain(f"{recipe.name}: already installed ({found.package} {found.version}, "
                                f"{found.device}) in {engine_env.home(recipe.name)}"))
            continue
        minutes = recipe.estimate_s(target) / 60
        console.print(plain(f"{recipe.name}: installing {recipe.packages.get(target, '')} for {target} into "
                            f"{engine_env.home(recipe.name)} — about {minutes:.0f} min on 2 cores with a cold pip "
                            f"cache; log: {engine_env.log_path(recipe.name)}"))
        reporter = progress_reporter(console)
        try:
            record = environments.install(recipe, target, install_progress(reporter, recipe.name), force=force)
        except BaseException as exc:
            reporter.end_phase(failed=True)
            if isinstance(exc, engine_env.StepFailed):
                raise CapbenchError(f"{recipe.name} was not installed (nothing is left marked installed): {exc}") \
                    from None
            raise
        reporter.end_phase()
        console.print(plain(f"{recipe.name}: installed {record.package} {record.version} ({record.variant}) in "
                            f"{duration(record.install_s)}"))


@engines.command("remove")
@click.argument("names", nargs=-1, required=True)
def engines_remove(names: tuple[str, ...]) -> None:
    """Delete engine environments."""
    from capbench_core.contract import engine_env
    from capbench_core.serving import environments

    for recipe in _recipes(names):
        gone = environments.remove(recipe.name)
        click.echo(f"{recipe.name}: {'removed ' + str(engine_env.home(recipe.name)) if gone else 'was not installed'}")


@cli.group()
def hardware() -> None:
    """What capbench sees on this machine."""


@hardware.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print the HardwareSpec as JSON.")
def show_hardware(as_json: bool) -> None:
    """Devices, fingerprint and peaks (CPU peaks are measured once and cached)."""
    from capbench_core.measure.hardware import detect_hardware

    spec = detect_hardware(plugin_manager())
    if as_json:
        click.echo(spec.model_dump_json(indent=2))
        return
    click.echo(f"fingerprint: {spec.fingerprint}")
    for d in spec.devices:
        mem = f", {d.memory_bytes / 2**30:.1f} GiB" if d.memory_bytes else ""
        click.echo(f"{d.kind}: {d.count}x {d.model} ({d.vendor}{mem})")
    bw = spec.peak_mem_bw_gbps
    click.echo(f"peak memory bandwidth: {format_peak(bw.value, 'GB/s')} ({bw.source}; {bw.note})")
    for dtype, peak in spec.peak_flops_tflops.items():
        click.echo(f"peak dense {dtype}: {format_peak(peak.value, 'TFLOP/s')} ({peak.source}; {peak.note})")


@hardware.command("measure")
def measure_hardware() -> None:
    """Measure this machine's CPU peaks again (memory bandwidth, float32 and bfloat16 GEMM) and cache them
    unless other processes kept the CPUs busy; later runs use the cached peaks."""
    from capbench_core.measure.hardware import detect_hardware, is_busy, peaks_cache_file

    with make_console().status("measuring memory bandwidth and GEMM peaks (about 20 s)…"):
        spec = detect_hardware(plugin_manager(), refresh_peaks=True)
    _print_peaks(spec)
    cached = peaks_cache_file(spec.fingerprint)
    busy = cached.is_file() and is_busy(json.loads(cached.read_text()))
    click.echo(f"cached in {cached}" if cached.is_file() and not busy else
               "not cached: other processes kept the CPUs busy; run it again on a quiet machine")


def _print_peaks(spec: Any) -> None:
    bw = spec.cpu_peak_mem_bw_gbps or spec.peak_mem_bw_gbps
    click.echo(f"CPU peak memory bandwidth: {format_peak(bw.value, 'GB/s')} ({bw.source}; {bw.note})")
    for dtype, peak in (spec.cpu_peak_flops_tflops or spec.peak_flops_tflops).items():
        click.echo(f"CPU peak dense {dtype}: {format_peak(peak.value, 'TFLOP/s')} ({peak.source}; {peak.note})")


@hardware.command("prices")
@click.option("--accelerator", default=None, help="Only rows for this datasheet accelerator (e.g. 'H100 SXM').")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def show_prices(accelerator: str | None, as_json: bool) -> None:
    """The dated, sourced hourly price table used by `capbench run --price-from ROW_ID`."""
    from capbench_core.analytics.cost import price_table

    rows = [r for r in price_table() if accelerator is None or r.accelerator == accelerator]
    if as_json:
        click.echo(json.dumps([r.model_dump() for r in rows], indent=2))
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(title="hourly prices (check the date before you publish a cost)", title_justify="left")
    for col in ("row id", "accelerator", "GPUs", "$/h", "$/GPU-h", "pricing", "as of", "source"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(Text(r.id), Text(r.accelerator), str(r.gpus), f"{r.usd_per_hour:g}",
                      f"{r.usd_per_hour / r.gpus:.2f}", r.pricing, r.as_of, Text(f"{r.source_kind}: {r.source}"))
    print_fit(make_console(), table)


