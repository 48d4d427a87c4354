#!/usr/bin/env python
"""Does SGD-SaI match AdamW here? Run the GPT-2 recipe with several optimizers and learning rates.

    python scripts/compare_optimizers.py                      # offline default, full grid
    python scripts/compare_optimizers.py --quick              # a couple of minutes (CI smoke test)
    python scripts/compare_optimizers.py --config configs/gpt2-124m.yaml --max_steps 2000

Every run uses the same recipe config, seed, data order and number of tokens; only ``--optim`` and
``--learning_rate`` change. Each run is a fresh subprocess (so peak memory is per run). Output in
``--out_dir`` (default ``outputs/compare``): ``compare.md`` (the table), ``compare.json`` (every
run's metrics and loss history), ``loss_curves.png`` (train and eval loss of each optimizer's best
learning rate) and ``lr_sensitivity.png`` (final eval loss against learning rate). ``sgd_sai`` runs
also track g-SNR drift (``--gsnr_track_every``, default every quarter of the run): the table's last
column says how far the blocks' g-SNR moved from the one their scales were fixed with.

Learning-rate grids (``--grid`` overrides, e.g. ``--grid sgd_sai=1e-4,1e-3``):

* ``sgd_sai``            3e-4, 1e-3, 3e-3, 1e-2  (raw g-SNR scales: AdamW's order of magnitude and above)
* ``adamw_torch_fused``  3e-4, 1e-3, 3e-3
* ``adam_mini``          3e-4, 1e-3, 3e-3
* ``sgd`` (momentum 0.9) 1e-2, 3e-2, 1e-1, 3e-1

(the SGD grids reach one point further: on the offline default their best was at 3e-3 and 1e-1.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: Learning-rate grid of each optimizer (``--optim`` name -> lrs).
DEFAULT_GRIDS: dict[str, list[float]] = {
    "sgd_sai": [3e-4, 1e-3, 3e-3, 1e-2],
    "adamw_torch_fused": [3e-4, 1e-3, 3e-3],
    "adam_mini": [3e-4, 1e-3, 3e-3],
    "sgd": [1e-2, 3e-2, 1e-1, 3e-1],
}
#: ``--optim_args`` of each optimizer. The recipe config's own ``optim_args`` are meant for its
#: ``optim`` (SGD-SaI in the shipped configs), so ``sgd_sai`` keeps them and every other optimizer
#: gets these (none, unless listed).
OPTIM_ARGS: dict[str, str] = {"sgd": "momentum=0.9"}


def optim_overrides(optim: str) -> list[str]:
    """The ``--optim_args`` override of ``optim``'s runs (none for ``sgd_sai``: the config's)."""
    return [] if optim == "sgd_sai" else ["--optim_args", OPTIM_ARGS.get(optim, "")]
#: ``--quick``: a tiny model for a few steps, the lowest and highest point of each grid.
QUICK_OVERRIDES = [
    "--n_layer", "2", "--n_embd", "64", "--n_head", "2", "--tokenizer_vocab_size", "512",
    "--corpus_max_files", "30", "--block_size", "64", "--max_steps", "12", "--warmup_steps", "2",
    "--eval_steps", "6", "--logging_steps", "2", "--per_device_train_batch_size", "8",
    "--max_eval_samples", "16", "--eval_on_start", "true",
]


# ----------------------------------------------------------------------------- one run (child)
def _single_run(spec: dict[str, Any]) -> None:
    """Child process: one recipe run, then its measurements as JSON on ``spec["result"]``."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from transformers import TrainerCallback
    from transformers import trainer as trainer_module

    class StepTimer(TrainerCallback):
        """Wall time of the training steps alone (evaluations excluded) and optimizer-state bytes."""

        def __init__(self) -> None:
            self.seconds = 0.0
            self.state_bytes = 0
            self.param_bytes = 0
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, optimizer=None, model=None, **kwargs):
            self.seconds += time.perf_counter() - self._start
            if state.global_step == 1:
                self.state_bytes = optimizer_state_bytes(optimizer)
                self.param_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)

    timer = StepTimer()
    trainer_module.DEFAULT_CALLBACKS.append(timer)  # every Trainer of this process reports to it
    import pretrain_gpt2

    result = pretrain_gpt2.main(spec["argv"])
    args = result.trainer.args
    tokens = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * spec["block_size"]
    out = {
        "argv": spec["argv"],
        "optim": spec["optim"],
        "learning_rate": spec["learning_rate"],
        "metrics": result.metrics,
        "log_history": result.trainer.state.log_history,
        "state_bytes": timer.state_bytes,
        "param_bytes": timer.param_bytes,
        "train_tokens": tokens,
        "tokens_per_second": tokens / timer.seconds if timer.seconds else float("nan"),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    Path(spec["result"]).write_text(json.dumps(out, default=float))


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of every tensor in the optimizer's state (unwrapping accelerate's wrapper)."""
    import torch

    inner = getattr(optimizer, "optimizer", optimizer)
    return sum(
        t.numel() * t.element_size() for state in inner.state.values() for t in state.values() if torch.is_tensor(t)
    )


# ----------------------------------------------------------------------------- the sweep (parent)
def parse_grid(items: Sequence[str], optimizers: Sequence[str]) -> dict[str, list[float]]:
    """``DEFAULT_GRIDS`` restricted to ``optimizers``, with ``name=lr,lr`` overrides."""
    grids = {name: list(DEFAULT_GRIDS.get(name, [1e-3])) for name in optimizers}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or name not in grids:
            raise ValueError(f"--grid {item!r}: expected NAME=LR[,LR...] with NAME one of {list(grids)}")
        try:
            grids[name] = [float(v) for v in values.split(",") if v]
        except ValueError as err:
            raise ValueError(f"--grid {item!r}: {err}") from None
    return grids


def run_one(
    config: str,
    optim: str,
    lr: float,
    out_dir: Path,
    extra: Sequence[str],
    block_size: int,
    gsnr_track_every: int = 0,
    resume: bool = False,
) -> dict[str, Any]:
    """Run one (optimizer, lr) point in a fresh interpreter and return its measurements.

    ``sgd_sai`` runs also track g-SNR drift every ``gsnr_track_every`` steps (0: off). With
    ``resume``, a finished run of the same arguments in ``out_dir`` is reused instead."""
    if optim == "sgd_sai" and gsnr_track_every:
        extra = [*extra, "--gsnr_track_every", str(gsnr_track_every)]
    run_dir = out_dir / "runs" / f"{optim}-lr{lr:g}"
    result_file = run_dir / "result.json"
    argv = [
        config, "--optim", optim, "--learning_rate", repr(lr), "--output_dir", str(run_dir),
        "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no",
        *optim_overrides(optim), *extra,
    ]  # fmt: skip
    spec = {"argv": argv, "optim": optim, "learning_rate": lr, "result": str(result_file), "block_size": block_size}
    if resume and result_file.is_file():
        previous = json.loads(result_file.read_text())
        if previous.get("argv") == argv:
            print(f"[compare] reusing {result_file} (same arguments)", flush=True)
            return previous
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log = run_dir / "log.txt"
    with log.open("w") as fh:
        proc = subprocess.run(
            [sys.executable, __file__, "--_run", json.dumps(spec)], stdout=fh, stderr=subprocess.STDOUT, env=env
        )
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"run {optim} lr={lr:g} failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
    return json.loads(result_file.read_text())


def eval_losses(run: dict[str, Any]) -> list[tuple[int, float]]:
    return [(h["step"], h["eval_loss"]) for h in run["log_history"] if "eval_loss" in h]


def train_losses(run: dict[str, Any]) -> list[tuple[int, float]]:
    return [(h["step"], h["loss"]) for h in run["log_history"] if "loss" in h]


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run: best and final eval loss, perplexity, tokens/s, memory."""
    rows = []
    for run in runs:
        evals = [loss for _, loss in eval_losses(run)]
        final = run["metrics"]["eval_loss"]
        rows.append(
            {
                "optim": run["optim"],
                "learning_rate": run["learning_rate"],
                "best_eval_loss": min(evals + [final]),
                "final_eval_loss": final,
                "perplexity": math.exp(final) if final < 50 else float("inf"),
                "tokens_per_second": run["tokens_per_second"],
                "state_bytes": run["state_bytes"],
                "state_over_params": run["state_bytes"] / run["param_bytes"] if run["param_bytes"] else float("nan"),
                "peak_rss_mb": run["peak_rss_mb"],
                **last_drift(run),
            }
        )
    return rows


def last_drift(run: dict[str, Any]) -> dict[str, float]:
    """The last logged ``gsnr_drift/*`` values of a run, keyed ``drift_spearman`` etc. (empty if untracked)."""
    logged = [h for h in run["log_history"] if "gsnr_drift/spearman" in h]
    if not logged:
        return {}
    last = logged[-1]
    return {
        "drift_step": last["step"],
        "drift_spearman": last["gsnr_drift/spearman"],
        "drift_max_ratio": last["gsnr_drift/max_ratio"],
        "drift_median_ratio": last["gsnr_drift/median_ratio"],
    }


def best_per_optimizer(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["optim"] not in best or _key(row) < _key(best[row["optim"]]):
            best[row["optim"]] = row
    return best


def _key(row: dict[str, Any]) -> float:
    value = row["final_eval_loss"]
    return value if math.isfinite(value) else float("inf")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    best = best_per_optimizer(rows)
    lines = [
        "| optimizer | lr | best eval loss | final eval loss | perplexity | tokens/s | optimizer state | state / params "
        "| peak RSS | g-SNR drift at the end (Spearman / max / median ratio) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in sorted(rows, key=lambda r: (r["optim"], r["learning_rate"])):
        mark = " **(best)**" if best[row["optim"]] is row else ""
        lines.append(
            f"| {row['optim']}{mark} | {row['learning_rate']:g} | {row['best_eval_loss']:.3f} | "
            f"{row['final_eval_loss']:.3f} | {row['perplexity']:.1f} | {row['tokens_per_second']:.0f} | "
            f"{row['state_bytes'] / 2**20:.2f} MiB | {row['state_over_params']:.2f}x | {row['peak_rss_mb']:.0f} MB | "
            f"{drift_cell(row)} |"
        )
    return "\n".join(lines)


def drift_cell(row: dict[str, Any]) -> str:
    if "drift_spearman" not in row:
        return "-"
    return (
        f"{row['drift_spearman']:.2f} / {row['drift_max_ratio']:.1f}x / {row['drift_median_ratio']:.2f}x "
        f"(step {row['drift_step']})"
    )


def _save(fig: Any, ax: Any, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    """Label ``ax``, add its legend, write ``fig`` to ``path`` and close it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(runs: list[dict[str, Any]], rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """``loss_curves.png`` (best lr of each optimizer) and ``lr_sensitivity.png``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install 'sai-hf[plots]')")
        return []
    best = best_per_optimizer(rows)
    palette = plt.get_cmap("tab10")
    colors = {name: palette(i) for i, name in enumerate(sorted(best))}
    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        if best[run["optim"]]["learning_rate"] != run["learning_rate"]:
            continue
        label = f"{run['optim']} lr={run['learning_rate']:g}"
        steps, losses = zip(*train_losses(run)) if train_losses(run) else ((), ())
        ax.plot(steps, losses, color=colors[run["optim"]], alpha=0.45, lw=1)
        if eval_losses(run):
            steps, losses = zip(*eval_losses(run))
            ax.plot(steps, losses, "o-", color=colors[run["optim"]], label=f"{label} (eval)")
    curves = _save(
        fig, ax, "step", "loss (faint: train, markers: eval)", "GPT-2 recipe: best learning rate of each optimizer",
        out_dir / "loss_curves.png",
    )  # fmt: skip

    fig, ax = plt.subplots(figsize=(7, 5))
    for name in sorted(best):
        points = sorted((r["learning_rate"], r["final_eval_loss"]) for r in rows if r["optim"] == name)
        lrs, losses = zip(*points)
        ax.plot(lrs, [l if math.isfinite(l) else float("nan") for l in losses], "o-", color=colors[name], label=name)
    ax.set_xscale("log")
    sensitivity = _save(
        fig, ax, "learning rate", "final eval loss", "Learning-rate sensitivity", out_dir / "lr_sensitivity.png"
    )
    return [curves, sensitivity]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "gpt2-local.yaml"), help="recipe config")
    parser.add_argument("--optimizers", default=",".join(DEFAULT_GRIDS), help="comma-separated --optim names")
    parser.add_argument("--grid", action="append", default=[], metavar="NAME=LR,LR", help="override a grid")
    parser.add_argument("--out_dir", type=Path, default=ROOT / "outputs" / "compare")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps, two lrs each (CI smoke test)")
    parser.add_argument("--max_steps", type=int, default=None, help="override the config's max_steps")
    parser.add_argument(
        "--gsnr_track_every",
        type=int,
        default=None,
        help="sgd_sai runs log g-SNR drift every N steps (default: a quarter of max_steps; 0: off)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="reuse the runs already finished in --out_dir with the same arguments"
    )
    parser.add_argument("--_run", help=argparse.SUPPRESS)
    args, recipe_overrides = parser.parse_known_args(argv)
    if args._run:
        _single_run(json.loads(args._run))
        return {}

    from sai_hf.recipes.config import load_yaml_config

    config = load_yaml_config(args.config)
    optimizers = [name.strip() for name in args.optimizers.split(",") if name.strip()]
    grids = parse_grid(args.grid, optimizers)
    extra = list(recipe_overrides)
    if args.quick:
        grids = {name: [lrs[0], lrs[-1]] if len(lrs) > 1 else lrs for name, lrs in grids.items()}
        extra = QUICK_OVERRIDES + extra
    if args.max_steps is not None:
        extra += ["--max_steps", str(args.max_steps)]
    block_size = int(_last_override(extra, "--block_size", config.get("block_size", 128)))
    max_steps = int(_last_override(extra, "--max_steps", config.get("max_steps", 0)))
    default_every = max(1, max_steps // 4) if max_steps > 0 else 0
    track_every = args.gsnr_track_every if args.gsnr_track_every is not None else default_every
    args.out_dir.mkdir(parents=True, exist_ok=True)

    runs = []
    started = time.perf_counter()
    for optim in optimizers:
        for lr in grids[optim]:
            print(f"[compare] {optim} lr={lr:g} ...", flush=True)
            runs.append(run_one(args.config, optim, lr, args.out_dir, extra, block_size, track_every, args.resume))
    rows = summarize(runs)
    table = markdown_table(rows)
    report = {
        "config": args.config,
        "overrides": extra,
        "grids": grids,
        "gsnr_track_every": track_every,
        "rows": rows,
        "runs": runs,
        "wall_seconds": time.perf_counter() - started,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    (args.out_dir / "compare.json").write_text(json.dumps(report, indent=1, default=float))
    (args.out_dir / "compare.md").write_text(table + "\n")
    pictures = plot(runs, rows, args.out_dir)
    print(table)
    print(f"[compare] {len(runs)} runs in {report['wall_seconds'] / 60:.1f} min; results in {args.out_dir}")
    for path in pictures:
        print(f"[compare] wrote {path}")
    return report


def _last_override(tokens: Sequence[str], flag: str, default: Any) -> Any:
    value = default
    for i, token in enumerate(tokens[:-1]):
        if token == flag:
            value = tokens[i + 1]
    return value


if __name__ == "__main__":
    main()
