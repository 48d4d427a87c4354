"""Pictures of what SaI did to a model (per-block g-SNR bars, g-SNR over training) and of a learning-rate range test.
Needs matplotlib (``pip install 'sai-hf[plots]'``); the rest of sai-hf does not."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["LAYER_TYPES", "figure", "layer_type", "plot_gsnr_bars", "plot_gsnr_history", "plot_lr_find", "save_figure"]

#: Layer types in display order, each with the name pattern that identifies it (first match wins).
LAYER_TYPES: tuple[tuple[str, str], ...] = (
    ("lora_A", r"lora_A"),
    ("lora_B", r"lora_B"),
    ("bias", r"(^|\.)bias$|_bias$"),
    ("norm", r"norm|ln_|\.ln\b|layernorm"),
    ("embedding", r"wte|wpe|embed"),
    ("attention", r"attn|attention|q_proj|k_proj|v_proj|o_proj"),
    ("mlp", r"mlp|c_fc|fc\d|gate_proj|up_proj|down_proj|ffn"),
    ("head", r"lm_head|score|classifier"),
)
#: The labels of :data:`LAYER_TYPES`, then ``"other"``: the display (and colour) order.
ORDER = [label for label, _ in LAYER_TYPES] + ["other"]

#: The ``gsnr.json`` key of ``gsnr / sqrt(numel)`` (drawn on a linear axis around 1).
RATIO_KEY = "gsnr_over_sqrt_numel"


def layer_type(name: str) -> str:
    """The :data:`LAYER_TYPES` label of a parameter name (``"other"`` when none matches)."""
    for label, pattern in LAYER_TYPES:
        if re.search(pattern, name):
            return label
    return "other"


def _colour(plt: Any, kind: str) -> Any:
    return plt.get_cmap("tab10")(ORDER.index(kind) % 10)


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("plotting needs matplotlib: pip install 'sai-hf[plots]'") from err
    return plt


def figure(size: tuple[float, float]) -> tuple[Any, Any]:
    """A new ``(figure, axes)`` of ``size`` inches (headless backend); ``ImportError`` without matplotlib."""
    return _pyplot().subplots(figsize=size)


def save_figure(fig: Any, ax: Any, path: str | Path, xlabel: str, ylabel: str, title: str, legend: bool = True) -> Path:
    """Label ``ax``, add its legend, write ``fig`` to ``path`` (PNG, 120 dpi), close it; return the path."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if legend:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_gsnr_bars(report: Mapping[str, Mapping[str, float]], path: str | Path, key: str = "gsnr") -> Path:
    """Bar chart of ``report[name][key]`` (a ``gsnr.json``) per block, log scale (``key=RATIO_KEY``:
    linear, around 1), grouped and coloured by :func:`layer_type`. Returns the PNG path."""
    plt = _pyplot()
    names = sorted(report, key=lambda n: (ORDER.index(layer_type(n)), n))
    values = [float(report[n][key]) for n in names]
    types = [layer_type(n) for n in names]
    colors = [_colour(plt, t) for t in types]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.12 * len(names) + 3), 5))
    if key == RATIO_KEY:  # a ratio near 1: bars up or down from 1 on a linear axis
        ax.bar(range(len(names)), [v - 1.0 for v in values], bottom=1.0, color=colors, width=0.85)
        ax.axhline(1.0, color="black", lw=0.8, ls="--")  # g-SNR = sqrt(numel): what scale_rule="sqrt_numel" assumes
    else:
        ax.bar(range(len(names)), values, color=colors, width=0.85)
        ax.set_yscale("log")
    if len(names) <= 60:
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    else:
        ax.set_xticks([])
    shown = [t for t in ORDER if t in types]
    ax.legend([plt.Rectangle((0, 0), 1, 1, color=_colour(plt, t)) for t in shown], shown, fontsize=8, ncol=2)
    return save_figure(
        fig, ax, path, "parameter block (grouped by layer type)", key,
        f"SGD-SaI {key} per block ({len(names)} blocks)", legend=False,
    )  # fmt: skip


def plot_gsnr_history(history: Mapping[str, Any], path: str | Path, max_lines: int = 40) -> Path:
    """g-SNR of each block over training (a ``gsnr_history.json``: ``{"steps": [...],
    "blocks": {name: [...]}}``), log scale, coloured by :func:`layer_type`; at most ``max_lines``
    blocks (evenly spaced in step-1 g-SNR order) to keep it readable. Returns the PNG path."""
    plt = _pyplot()
    steps: Sequence[int] = history["steps"]
    blocks: Mapping[str, Sequence[float]] = history["blocks"]
    names = sorted(blocks, key=lambda n: blocks[n][0])
    if len(names) > max_lines:
        stride = len(names) / max_lines
        names = [names[int(i * stride)] for i in range(max_lines)]
    fig, ax = plt.subplots(figsize=(9, 5))
    seen: set[str] = set()
    for name in names:
        kind = layer_type(name)
        ax.plot(steps, blocks[name], color=_colour(plt, kind), alpha=0.7, lw=1, label=None if kind in seen else kind)
        seen.add(kind)
    ax.set_yscale("log")
    return save_figure(
        fig, ax, path, "optimizer step", "g-SNR (recomputed; scales stay fixed at step 1)", "g-SNR drift per block"
    )


def plot_lr_find(result: Any, path: str | Path) -> str | None:
    """Loss and smoothed loss against the learning rate (log axis) of a :class:`sai_hf.range_test.LRFindResult`, the
    suggestion (if any) marked; ``None`` (nothing written) without matplotlib."""
    try:
        fig, ax = figure((7, 4.5))
    except ImportError:
        return None
    pairs = [(lr, loss) for lr, loss in zip(result.lrs, result.losses) if loss is not None]
    smooth = [(lr, s) for lr, s in zip(result.lrs, result.smoothed) if s is not None]
    if pairs:
        ax.plot(*zip(*pairs), color="0.7", lw=1, label="loss")
    if smooth:
        ax.plot(*zip(*smooth), color="C0", lw=2, label="smoothed loss")
        low = min([s for _, s in smooth] + [loss for _, loss in pairs])
        middle = sorted(s for _, s in smooth)[len(smooth) // 2]  # the diverged tail would squash the rest
        span = max(middle - low, 1e-3)
        ax.set_ylim(low - 0.05 * span, middle + 1.2 * span)
    if result.suggestion is not None:
        ax.axvline(result.suggestion, color="C3", ls="--", label=f"suggested {result.suggestion:.3g} ({result.method})")
    ax.set_xscale("log")
    return str(save_figure(fig, ax, path, "learning rate", "training loss", "learning-rate range test"))
