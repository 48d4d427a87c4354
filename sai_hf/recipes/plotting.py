"""An optional loss-curve PNG, drawn with matplotlib when it is installed (it is not a dependency)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def loss_curves(log_history: Sequence[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """``(step, loss)`` points of the training and evaluation losses in ``Trainer``'s log history."""
    curves: dict[str, list[tuple[int, float]]] = {"train": [], "eval": []}
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            curves["train"].append((entry["step"], entry["loss"]))
        if "eval_loss" in entry and "step" in entry:
            curves["eval"].append((entry["step"], entry["eval_loss"]))
    return curves


def plot_loss_curve(log_history: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Write the loss curves to ``path`` (PNG); return it, or ``None`` without matplotlib or points."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    curves = loss_curves(log_history)
    if not curves["train"] and not curves["eval"]:
        return None
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    for name, marker in (("train", "."), ("eval", "o")):
        if curves[name]:
            steps, losses = zip(*curves[name])
            axes.plot(steps, losses, marker=marker, label=f"{name} loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return Path(path)
