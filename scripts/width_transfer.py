#!/usr/bin/env python
"""Does one learning rate carry across model widths? An lr grid per scaling rule at several GPT-2 widths.

    python scripts/width_transfer.py --jobs 2                 # widths 64,128,256,512
    python scripts/width_transfer.py --widths 64,128 --out_dir outputs/w --block_size 128   # recipe fields pass through

For each width the GPT-2 offline recipe (``configs/gpt2-local.yaml``: depth, heads, vocabulary, data,
batch fixed; ``--max_steps`` steps, 10 warm-up steps then cosine, one evaluation at the end; other
``--field value`` arguments go to the recipe, default ``--block_size 64``) is run by
``scripts/compare_optimizers.py`` with a learning-rate grid for each rule:

* ``sgd_sai``             SGD-SaI, ``normalize=none`` (the default: per-block rate ``lr * gsnr_i``)
* ``sgd_sai_max``         ``normalize=max`` (``lr * gsnr_i / max_k gsnr_k``, the paper)
* ``sgd_sai_sqrt_numel``  ``scale_rule=sqrt_numel`` (``lr * sqrt(numel_i)``)
* ``adamw_torch_fused``   AdamW, the reference

A grid starts at :data:`START_GRIDS` (the same at every width: no scaling is assumed) on the 1-2-5
ladder, and while its best final eval loss sits on an edge the next ladder value past that edge is
added (at most ``--max_extensions`` times), so every best has a neighbour on each side. The best of
a grid is refined by a parabola through the best and its two neighbours in ``log(lr)``
(:func:`vertex`). Written to ``--out_dir``: ``w<width>/compare.{json,md}`` (every run's losses),
``width_transfer.json`` (per rule and width: the grid, final losses, grid best, refined best, best
loss; per rule: the spread of the best lr across widths) and ``width_transfer.png`` (best lr
against width, log-log). A rule *transfers* when its refined best lr stays within 2x (spread <= 2)
across the widths. Arguments are checked before any sweep starts (a width ``n_head`` does not divide,
``--max_steps`` < 1, ``--max_extensions`` < 0, and each width's ``compare_optimizers.py`` command as
that script checks it): a bad one is one error line, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: Rules compared, in display order, with their labels.
RULES: dict[str, str] = {
    "sgd_sai": "SGD-SaI, normalize=none",
    "sgd_sai_max": "SGD-SaI, normalize=max",
    "sgd_sai_sqrt_numel": "SGD-SaI, scale_rule=sqrt_numel",
    "adamw_torch_fused": "AdamW",
}
#: First grid of each rule at every width (1-2-5 ladder values).
START_GRIDS: dict[str, list[float]] = {
    "sgd_sai": [1e-3, 2e-3, 5e-3],
    "sgd_sai_max": [1.0, 2.0, 5.0],
    "sgd_sai_sqrt_numel": [1e-3, 2e-3, 5e-3],
    "adamw_torch_fused": [1e-3, 2e-3, 5e-3],
}
#: Largest spread (max / min) of the best lr across widths for a rule to count as transferring.
TRANSFER_SPREAD = 2.0


def ladder_neighbour(lr: float, up: bool) -> float:
    """The next value of the 1-2-5 ladder above (``up``) or below ``lr`` (itself a ladder value)."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = round(lr / 10**exponent, 6)
    steps = [1.0, 2.0, 5.0]
    index = min(range(3), key=lambda i: abs(steps[i] - mantissa)) + (1 if up else -1)
    exponent += index // 3
    return float(f"{steps[index % 3]}e{exponent}")


def final_losses(report: Mapping[str, Any], optim: str) -> dict[float, float]:
    """``{lr: final eval loss}`` of ``optim``'s runs in a ``compare.json`` (a non-finite loss is ``inf``)."""
    out = {}
    for row in report["rows"]:
        if row["optim"] == optim:
            loss = row["final_eval_loss"]
            out[float(row["learning_rate"])] = float(loss) if loss is not None and math.isfinite(loss) else math.inf
    return dict(sorted(out.items()))


def grid_best(losses: Mapping[float, float]) -> float:
    """The learning rate of the lowest final loss."""
    return min(losses, key=lambda lr: losses[lr])


def vertex(losses: Mapping[float, float]) -> float:
    """The refined best lr: the vertex of the parabola through the grid best and its two neighbours in
    ``(log lr, loss)``, kept between those neighbours; the grid best itself at an edge or when a
    neighbour's loss is not finite."""
    lrs = sorted(losses)
    i = lrs.index(grid_best(losses))
    if i == 0 or i == len(lrs) - 1:
        return lrs[i]
    xs = [math.log(lr) for lr in lrs[i - 1 : i + 2]]
    ys = [losses[lr] for lr in lrs[i - 1 : i + 2]]
    if not all(math.isfinite(y) for y in ys):
        return lrs[i]
    (x0, x1, x2), (y0, y1, y2) = xs, ys
    denominator = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denominator
    b = (x2**2 * (y0 - y1) + x1**2 * (y2 - y0) + x0**2 * (y1 - y2)) / denominator
    if a <= 0:
        return lrs[i]
    return math.exp(min(max(-b / (2 * a), x0), x2))


def grid_needs(losses: Mapping[float, float]) -> float | None:
    """The ladder value to add to a grid whose best sits on an edge (``None``: the best has two neighbours)."""
    lrs = sorted(losses)
    best = grid_best(losses)
    if best == lrs[0]:
        return ladder_neighbour(best, up=False)
    if best == lrs[-1]:
        return ladder_neighbour(best, up=True)
    return None


def compare_command(width: int, grids: Mapping[str, Sequence[float]], out_dir: Path, args: argparse.Namespace) -> list[str]:
    """The ``compare_optimizers.py`` command of one width with ``grids``."""
    command = [
        sys.executable, str(ROOT / "scripts" / "compare_optimizers.py"), "--config", args.config,
        "--optimizers", ",".join(grids), "--out_dir", str(out_dir), "--resume", "--max_steps", str(args.max_steps),
        "--gsnr_track_every", "0",
    ]  # fmt: skip
    for optim, lrs in grids.items():
        command += ["--grid", f"{optim}={','.join(f'{lr:g}' for lr in lrs)}"]
    return command + list(args.recipe_args) + [
        "--n_embd", str(width), "--warmup_steps", "10", "--eval_steps", str(args.max_steps),
        "--logging_steps", "10", "--eval_on_start", "false",
    ]  # fmt: skip


def sweep_width(width: int, args: argparse.Namespace, threads: int) -> None:
    """Run (or resume) one width's grids into ``--out_dir/w<width>``, extending each past its edge."""
    out_dir = args.out_dir / f"w{width}"
    grids = {rule: list(START_GRIDS[rule]) for rule in args.rules}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for attempt in range(args.max_extensions + 1):
        log = out_dir.with_suffix(".log")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as fh:
            proc = subprocess.run(compare_command(width, grids, out_dir, args), stdout=fh, stderr=subprocess.STDOUT, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"width {width}: compare_optimizers.py failed (exit {proc.returncode}); see {log}")
        report = json.loads((out_dir / "compare.json").read_text())
        losses = {rule: final_losses(report, rule) for rule in grids}
        added = {rule: grid_needs(losses[rule]) for rule in grids}
        if all(lr is None for lr in added.values()) or attempt == args.max_extensions:
            break
        for rule, lr in added.items():
            if lr is not None:
                grids[rule] = sorted(grids[rule] + [lr])
        print(f"[width] {width}: extending {', '.join(f'{r} to {lr:g}' for r, lr in added.items() if lr)}", flush=True)


def read_width(out_dir: Path, width: int, rules: Sequence[str]) -> tuple[dict[str, dict[float, float]], dict[str, Any]]:
    """``({rule: {lr: loss}}, provenance)`` of one width's finished ``compare.json``; ``ValueError`` naming the
    file when it is missing, unreadable or lacks one of ``rules``."""
    path = out_dir / f"w{width}" / "compare.json"
    try:
        report = json.loads(path.read_text())
        losses = {rule: final_losses(report, rule) for rule in rules}
        provenance = report["provenance"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a finished sweep of width {width} ({err!r}); run without --no-run") from None
    missing = [rule for rule, by_lr in losses.items() if not by_lr]
    if missing:
        raise ValueError(f"{path}: no runs of {', '.join(missing)}; run without --no-run, or pass --rules")
    return losses, provenance


def power_law_exponent(widths: Sequence[int], bests: Sequence[float]) -> float | None:
    """``a`` of the least-squares fit ``log(best) = a log(width) + c`` (best lr ~ width^a); ``None`` below 2 widths."""
    if len(widths) < 2:
        return None
    xs, ys = [math.log(w) for w in widths], [math.log(b) for b in bests]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def summarize(results: Mapping[int, Mapping[str, Mapping[float, float]]]) -> dict[str, Any]:
    """Per rule: per width the grid, its losses, the grid and refined best and the best loss; and the
    spread (max / min) of the refined best across widths, whether it is within :data:`TRANSFER_SPREAD`,
    and the exponent ``a`` of a power-law fit, best lr ~ width^a (:func:`power_law_exponent`)."""
    rules: dict[str, Any] = {}
    for rule in RULES:
        per_width = {}
        for width, by_rule in sorted(results.items()):
            if rule not in by_rule:
                continue
            losses = by_rule[rule]
            per_width[str(width)] = {
                "losses": {f"{lr:g}": loss for lr, loss in losses.items()},
                "grid_best": grid_best(losses),
                "refined_best": vertex(losses),
                "best_loss": losses[grid_best(losses)],
                "bracketed": grid_needs(losses) is None,
            }
        if not per_width:
            continue
        bests = [entry["refined_best"] for entry in per_width.values()]
        spread = max(bests) / min(bests)
        rules[rule] = {
            "label": RULES[rule], "widths": per_width, "spread": spread, "transfers": spread <= TRANSFER_SPREAD,
            "exponent": power_law_exponent([int(w) for w in per_width], bests),
        }  # fmt: skip
    return {"rules": rules, "transfer_spread": TRANSFER_SPREAD}


def plot(summary: Mapping[str, Any], path: Path, title: str) -> Path:
    """Best lr against width, log-log, one line per rule, each normalised to its value at the smallest
    width (so the rules' very different lr scales share one axis); the band is the 2x criterion."""
    from sai_hf.plots import figure, save_figure

    fig, ax = figure((6.4, 4.2))
    for rule, entry in summary["rules"].items():
        widths = [int(w) for w in entry["widths"]]
        bests = [entry["widths"][str(w)]["refined_best"] for w in widths]
        ax.plot(widths, [b / bests[0] for b in bests], marker="o", label=f"{entry['label']} ({bests[0]:.2g} at {widths[0]})")
    ax.axhspan(1 / TRANSFER_SPREAD, TRANSFER_SPREAD, color="grey", alpha=0.15, label="within 2x")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    return save_figure(fig, ax, path, "width (n_embd)", "best lr / best lr at the smallest width", title)


def check_numbers(args: argparse.Namespace, widths: Sequence[int]) -> None:
    """``ValueError`` naming the first of ``--jobs``, ``--widths``, ``--max_steps`` (0 or less would let the
    Trainer train by epochs) and ``--max_extensions`` that is out of range."""
    if args.jobs < 1 or any(w < 1 for w in widths):
        raise ValueError("--jobs and --widths must be positive")
    if args.max_steps < 1:
        raise ValueError(f"--max_steps {args.max_steps}: expected a number of steps >= 1")
    if args.max_extensions < 0:
        raise ValueError(f"--max_extensions {args.max_extensions}: expected a number of extensions >= 0")


def recipe_n_head(config: str, recipe_args: Sequence[str]) -> int:
    """The runs' ``n_head``: the last ``--n_head`` among ``recipe_args``, else the config's, else the recipe's
    default; ``ValueError`` naming the config file or the value when it cannot be read."""
    import dataclasses

    from sai_hf.recipes.arguments import GPT2ModelArguments
    from sai_hf.recipes.config import load_yaml_config

    if not Path(config).is_file():
        raise ValueError(f"--config {config}: no such file")
    value = load_yaml_config(config).get("n_head")
    for i, token in enumerate(recipe_args):
        if token == "--n_head" and i + 1 < len(recipe_args):
            value = recipe_args[i + 1]
        elif token.startswith("--n_head="):
            value = token.split("=", 1)[1]
    if value is None:
        return next(f.default for f in dataclasses.fields(GPT2ModelArguments) if f.name == "n_head")
    try:
        n_head = int(str(value))
    except ValueError:
        n_head = 0
    if n_head < 1:
        raise ValueError(f"n_head {value!r} (from {config} or --n_head): expected a whole number >= 1")
    return n_head


def check_widths_fit_heads(widths: Sequence[int], n_head: int) -> None:
    """``ValueError`` naming the first width that ``n_head`` attention heads do not divide (GPT-2 needs
    ``n_embd % n_head == 0``; the run would fail after the sweep started)."""
    odd = [w for w in sorted(widths) if w % n_head]
    if odd:
        raise ValueError(f"--widths: {odd[0]} is not divisible by n_head={n_head}; use multiples of {n_head} or set --n_head")


def check_compare_commands(widths: Sequence[int], args: argparse.Namespace) -> None:
    """Check each width's first ``compare_optimizers.py`` command as that script will (its ``plan``: the
    pass-through recipe flags, the config, the grids), running nothing: ``ValueError`` naming the width and
    the argument, before any sweep starts."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_optimizers", ROOT / "scripts" / "compare_optimizers.py")
    compare = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, compare)  # its dataclasses look their module up there
    spec.loader.exec_module(compare)
    for width in widths:
        command = compare_command(width, {rule: START_GRIDS[rule] for rule in args.rules}, args.out_dir / f"w{width}", args)
        try:
            compare.plan(command[2:])
        except (ValueError, OSError) as err:
            raise ValueError(f"width {width}: {err}") from None


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--widths", default="64,128,256,512", help="comma-separated n_embd values")
    parser.add_argument("--rules", default=",".join(RULES), help=f"comma-separated, of {', '.join(RULES)}")
    parser.add_argument("--config", default=str(ROOT / "configs" / "gpt2-local.yaml"))
    parser.add_argument("--max_steps", type=int, default=100)
    parser.add_argument("--max_extensions", type=int, default=4, help="grid extensions past an edge, per width")
    parser.add_argument("--jobs", type=int, default=1, help="widths run at once (threads are split between them)")
    parser.add_argument("--out_dir", type=Path, default=ROOT / "outputs" / "width-transfer")
    parser.add_argument("--no-run", action="store_true", help="summarise the finished runs in --out_dir, run nothing")
    args, args.recipe_args = parser.parse_known_args(argv)
    try:
        widths = sorted({int(w) for w in args.widths.split(",")}, reverse=True)
    except ValueError:
        parser.error(f"--widths: expected comma-separated integers, got {args.widths!r}")
    if "--block_size" not in args.recipe_args:
        args.recipe_args += ["--block_size", "64"]
    args.rules = [r for r in args.rules.split(",") if r]
    unknown = [r for r in args.rules if r not in RULES]
    if unknown or not args.rules:
        parser.error(f"--rules: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(RULES)}")
    try:
        check_numbers(args, widths)
        check_widths_fit_heads(widths, recipe_n_head(args.config, args.recipe_args))
        if not args.no_run:
            check_compare_commands(widths, args)
    except ValueError as err:
        parser.error(str(err))
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    if not args.no_run:
        with ThreadPoolExecutor(args.jobs) as pool:  # largest first: the longest sweeps start first
            for future in [pool.submit(sweep_width, w, args, threads) for w in widths]:
                future.result()
    try:
        read = {w: read_width(args.out_dir, w, args.rules) for w in widths}
    except ValueError as err:
        parser.error(str(err))
    summary = summarize({w: losses for w, (losses, _) in read.items()})
    command = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--no-run",)]
    summary.update(
        max_steps=args.max_steps, config=os.path.relpath(args.config, ROOT), widths=sorted(widths),
        recipe_args=args.recipe_args, command=" ".join(["width_transfer.py", *command]),
        provenance={str(w): prov for w, (_, prov) in sorted(read.items())},
    )  # fmt: skip
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "width_transfer.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, args.out_dir / "width_transfer.png", f"GPT-2, {args.max_steps} steps: best lr against width")
    for rule, entry in summary["rules"].items():
        bests = ", ".join(f"{w}: {e['refined_best']:.3g}" for w, e in entry["widths"].items())
        fit = "" if entry["exponent"] is None else f", ~ width^{entry['exponent']:.2f}"
        print(f"[width] {entry['label']}: best lr {bests}; spread {entry['spread']:.2f}x{fit}", flush=True)
    return summary


if __name__ == "__main__":
    main()
