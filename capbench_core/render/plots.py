"""Plots (matplotlib, optional: capbench[plots]). They draw what a study computed; they compute nothing."""

from __future__ import annotations

from typing import Any

from capbench_core.errors import CapbenchError


def write_plots(study: dict[str, Any], out_dir: Any) -> list[Any]:
    """tokens/s and $/Mtok vs sparsity (one line per batch), and predicted vs measured step time."""
    from pathlib import Path

    try:
        import matplotlib
    except ImportError:
        raise CapbenchError("--plot-dir needs matplotlib: pip install 'capbench[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    members = study["members"]
    batches = list(members[0]["by_batch"]) if members else []
    x = [m["sparsity"] for m in members]
    written = []
    for key, label, name in (("tok_per_s", "predicted decode tokens/s", "sparsity_tokens_per_s"),
                             ("usd_per_mtok", "predicted $ per million output tokens", "sparsity_cost")):
        if key == "usd_per_mtok" and all(m["by_batch"][b][key] is None for m in members for b in batches):
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for b in batches:
            ax.plot(x, [m["by_batch"][b][key] for m in members], marker="o", label=f"batch {b}")
        ax.set_xlabel("sparsity S = (E - k) / E")
        ax.set_ylabel(label)
        ax.set_title(f"{study['machine']['name']}: {study['description']}", fontsize=9)
        ax.legend()
        ax.grid(alpha=0.3)
        written += _save(fig, out / name)
        plt.close(fig)
    points = [p for p in study["measured"] if p["error"] is not None]
    if points:
        fig, ax = plt.subplots(figsize=(5, 5))
        for backend in sorted({p["backend"] for p in points}):
            mine = [p for p in points if p["backend"] == backend]
            ax.scatter([p["predicted_ms"] for p in mine], [p["measured_ms"] for p in mine], label=backend)
        top = max(max(p["predicted_ms"], p["measured_ms"]) for p in points) * 1.1
        ax.plot([0, top], [0, top], color="grey", linestyle="--", label="measured = predicted")
        ax.set_xlabel("roofline decode step, ms")
        ax.set_ylabel("measured decode step, ms")
        ax.legend()
        ax.grid(alpha=0.3)
        written += _save(fig, out / "sparsity_predicted_vs_measured")
        plt.close(fig)
    return written


def _save(fig: Any, stem: Any) -> list[Any]:
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    for path in paths:
        fig.savefig(path, bbox_inches="tight", dpi=120)
    return paths
