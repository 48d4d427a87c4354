#!/usr/bin/env python
"""Write every table of ``scripts/results/`` from the JSON of the run that produced it.

    python scripts/results/render.py           # rewrite the tables
    python scripts/results/render.py --check   # exit 1, naming each table that differs from its JSON

What it writes:

* ``<dir>/compare.md`` for every ``<dir>/compare.json`` (``compare_optimizers.compare_markdown``, the
  function the comparison itself writes it with);
* ``bench-cpu.md`` from ``bench-cpu.json`` (``bench_optimizers.report_markdown``, what the benchmark
  prints and writes as ``bench.md``);
* in ``scripts/results/README.md`` and the top-level ``README.md``, every block between ``<!-- generated: NAME -->`` and
  ``<!-- end generated: NAME -->``, by the renderer ``NAME`` of :data:`BLOCKS` (a provenance line and
  a table built from one JSON).

Text outside the blocks is prose: it quotes the tables but is not checked.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import bench_optimizers  # noqa: E402
import compare_optimizers  # noqa: E402

README = HERE / "README.md"

#: Where and when the results committed before the scripts recorded it (``provenance`` in their JSON)
#: were produced, from the commit messages and the notes of the sessions that ran them. The commit is
#: the one that committed the result (its runs used the tree just before it).
RECORDED: dict[str, dict[str, str]] = {
    "bench-cpu.json": {"machine": "2 CPUs, Intel Xeon (AVX-512)", "date": "2026-12-01", "commit": "31ce00e"},
    "gpt2-seeds": {"machine": "2-core AMD EPYC, two runs at a time (tokens/s not a benchmark)", "date": "2026-11-23", "commit": "5931d44"},
    "horizon": {"machine": "2-core CPU (not recorded)", "date": "2026-11-23", "commit": "dd3c1f6"},
    "lora-grid": {"machine": "2-core AMD EPYC", "date": "2026-11-23", "commit": "189bd66"},
    "lora-seeds": {"machine": "2-core Intel Xeon, one run at a time", "date": "2026-12-01", "commit": "6009207"},
    "gpt2-124m-lr": {"machine": "2-core Intel Xeon", "date": "2026-12-01", "commit": "f53ea54"},
    "lora-r16": {"machine": "2-core Intel Xeon", "date": "2026-12-01", "commit": "c4d3798"},
}


def load(name: str) -> dict[str, Any]:
    path = HERE / name / "compare.json" if (HERE / name).is_dir() else HERE / name
    return json.loads(path.read_text())


def provenance_line(name: str, report: dict[str, Any]) -> str:
    """``Command ... Machine ... Date ... Commit ...`` from the JSON, else from :data:`RECORDED`."""
    if "environment" in report:  # the benchmark
        env = report["environment"]
        command = env["command"].split("scripts/", 1)[-1]
        recorded = {k: env[k] for k in ("date", "commit") if env.get(k)}
        versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v and k != "sai-hf")
        machine = f"{env['cpu_count']} CPUs, {env['device_name']}, {env['threads']} threads, {env['dtype']}; {versions}"
        recorded = RECORDED.get(name, {}) | {"machine": machine} | recorded
    else:
        command = report["command"]
        recorded = report.get("provenance") or RECORDED[name]
        if report.get("provenance"):
            recorded = dict(recorded, machine=f"{recorded['machine']}, torch {recorded['torch']}")
    command = re.sub(r" --out_dir \S+| --out-dir \S+| --resume", "", command)
    return (
        f"Command: `python scripts/{command}`. Machine: {recorded['machine']}. "
        f"Date: {recorded['date']}. Commit: `{recorded['commit'][:7]}`."
    )


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def evals(run: dict[str, Any]) -> dict[int, float]:
    return dict(compare_optimizers.eval_losses(run))


def spike(run: dict[str, Any]) -> str:
    """The logged train loss that rose most above the lowest one logged before it (a spike)."""
    lowest, worst = math.inf, None
    for step, loss in compare_optimizers.train_losses(run):
        if worst is None or loss - lowest > worst[2]:
            worst = (step, loss, loss - lowest)
        lowest = min(lowest, loss)
    if worst is None or not math.isfinite(worst[2]):
        return "-"
    return f"{worst[1]:.2f} at step {worst[0]} (+{worst[2]:.2f})"


def per_seed_table(name: str) -> str:
    """Each optimizer's rows: lr, mean ± std of the final eval loss, then every seed's value."""
    report = load(name)
    seeds = report["seeds"]
    rows = []
    for row in sorted(report["rows"], key=lambda r: r["final_eval_loss"]):
        finals = {r["seed"]: r["final_eval_loss"] for r in report["per_run"] if (r["optim"], r["learning_rate"]) == (row["optim"], row["learning_rate"])}
        rows.append(
            [
                row["optim"],
                f"{row['learning_rate']:g}",
                f"{row['final_eval_loss']:.3f} ± {row['final_eval_loss_std']:.3f}",
                " / ".join(f"{finals[s]:.3f}" for s in seeds),
                f"{row['state_over_params']:.2f}x",
            ]
        )
    header = ["optimizer", "lr", "final eval loss, mean ± std", "seeds " + " / ".join(map(str, seeds)), "optimizer state / params"]
    return provenance_line(name, report) + "\n\n" + table(header, rows)


def grid_table(name: str) -> str:
    """One line per optimizer: the final eval loss at every lr of its grid (the best in bold)."""
    report = load(name)
    rows = []
    by_optim: dict[str, list[dict[str, Any]]] = {}
    for row in report["rows"]:
        by_optim.setdefault(row["optim"], []).append(row)
    best = compare_optimizers.best_per_optimizer(report["rows"])
    for optim, members in sorted(by_optim.items(), key=lambda item: compare_optimizers._key(best[item[0]])):
        cells = []
        for row in sorted(members, key=lambda r: r["learning_rate"]):
            value = f"{row['learning_rate']:g}: {row['final_eval_loss']:.3f}"
            cells.append(f"**{value}**" if row is best[optim] else value)
        rows.append([optim, " · ".join(cells), f"{best[optim]['learning_rate']:g}", f"{best[optim]['state_over_params']:.2f}x"])
    start = {round(evals(run)[0], 3) for run in report["runs"] if 0 in evals(run)}
    header = ["optimizer", "final eval loss by lr (seed " + ", ".join(map(str, report["seeds"])) + ")", "best lr", "optimizer state / params"]
    first = f" Every run starts from eval loss {start.pop():.3f}." if len(start) == 1 else ""
    return provenance_line(name, report) + first + "\n\n" + table(header, rows)


def curves_table(name: str) -> str:
    """One line per run: eval loss at every evaluation, and the highest logged train loss (a spike)."""
    report = load(name)
    runs = sorted(report["runs"], key=lambda r: (r["optim"], r["learning_rate"], r.get("seed") or 0))
    steps = sorted(set.intersection(*(set(evals(run)) for run in runs)))
    rows = []
    for run in runs:
        losses = evals(run)
        rows.append([run["optim"], f"{run['learning_rate']:g}", *(f"{losses[s]:.3f}" for s in steps), spike(run)])
    header = ["optimizer", "lr", *(f"eval loss, step {s}" for s in steps), "largest rise of the train loss"]
    return provenance_line(name, report) + "\n\n" + table(header, rows)


def horizon_table(name: str) -> str:
    """Eval loss of each optimizer at every evaluation, and the gap between the two."""
    report = load(name)
    runs = sorted(report["runs"], key=lambda r: r["optim"])
    steps = [s for s in sorted(set.intersection(*(set(evals(run)) for run in runs))) if s > 0]
    rows = [[f"{run['optim']} ({run['learning_rate']:g})", *(f"{evals(run)[s]:.3f}" for s in steps)] for run in runs]
    if len(runs) == 2:
        rows.append(["gap", *(f"{abs(evals(runs[0])[s] - evals(runs[1])[s]):.3f}" for s in steps)])
    return provenance_line(name, report) + "\n\n" + table(["eval loss at step", *map(str, steps)], rows)


def bench_summary(name: str) -> str:
    """Step time relative to torch's fused SGD (the floor) and fused AdamW, first step, state."""
    report = load(name)
    results = report["results"]
    cell: dict[tuple[str, str, float], dict[str, Any]] = {(r["optimizer"], r["size"], r["weight_decay"]): r for r in results}
    sizes = list(dict.fromkeys(r["size"] for r in results))
    decays = list(dict.fromkeys(r["weight_decay"] for r in results))
    fmt = bench_optimizers.fmt
    rows = []
    for key, label in dict.fromkeys((r["optimizer"], r["label"]) for r in results):
        cells = [f"{label}"]
        for decay in decays:
            for size in sizes:
                r = cell.get((key, size, decay))
                if r is None:
                    cells.append("n/a")
                    continue
                ms = f" ({r['step_ms_median']:.1f} ms)" if size == sizes[0] else ""
                cells.append(f"{fmt(r['ratio_to_sgd_fused'], '.2f', 'x')} / {fmt(r['ratio_to_adamw_fused'], '.2f', 'x')}{ms}")
        first = [cell.get((key, size, decays[0])) for size in sizes]
        cells.append(" / ".join(fmt(r and r["first_over_step"], ".2f", "x") for r in first))
        cells.append(fmt(first[0] and first[0]["state_over_param_bytes"], ".2f", "x"))
        rows.append(cells)
    header = [
        "optimizer",
        *(f"wd {decay:g}, {size}: vs SGD fused / AdamW fused" for decay in decays for size in sizes),
        f"first step / step (wd {decays[0]:g}, {' / '.join(sizes)})",
        "state / params",
    ]
    goals = bench_optimizers.goals_markdown(report["goals"])
    return provenance_line(name, report) + "\n\n" + table(header, rows) + "\n\nGoals (default SGDSaI):\n\n" + goals


def headline(_: str) -> str:
    """The top-level README's measured results, from the LoRA and GPT-2 seed sweeps, the 1000-step
    run and the benchmark (what a newcomer reads first must not drift from its runs either)."""
    def best(report: dict[str, Any], optim: str) -> dict[str, Any]:
        return compare_optimizers.best_per_optimizer(report["rows"])[optim]

    def loss(row: dict[str, Any]) -> str:
        return f"{row['final_eval_loss']:.3f} ± {row['final_eval_loss_std']:.3f}"

    lora, gpt2, horizon, bench = load("lora-seeds"), load("gpt2-seeds"), load("horizon"), load("bench-cpu.json")
    l_sai, l_adamw, l_mini = (best(lora, o) for o in ("sgd_sai", "adamw_torch_fused", "adam_mini"))
    g_sai, g_adamw = best(gpt2, "sgd_sai"), best(gpt2, "adamw_torch_fused")
    h_sai, h_adamw = (next(r for r in horizon["runs"] if r["optim"] == o) for o in ("sgd_sai", "adamw_torch_fused"))
    h_steps = max(evals(h_sai))
    step = next(r for r in bench["results"] if r["optimizer"] == "sgdsai" and r["weight_decay"] > 0)
    return (
        f"- **LoRA fine-tuning: a tie with AdamW at half the optimizer state.** Final eval loss {loss(l_sai)}\n"
        f"  (SGD-SaI) against {loss(l_adamw)} (AdamW) and {loss(l_mini)} (Adam-mini), at SGD-SaI's lr of\n"
        f"  {l_sai['learning_rate']:g}, {l_sai['learning_rate'] / l_adamw['learning_rate']:.0f}x AdamW's.\n"
        f"- **Small-model pretraining: SGD-SaI trails AdamW.** A 4.2M-parameter GPT-2: {loss(g_sai)} against\n"
        f"  AdamW's {loss(g_adamw)} after {max(evals(gpt2['runs'][0]))} steps "
        f"(+{g_sai['final_eval_loss'] - g_adamw['final_eval_loss']:.2f} nats, many times the seed spread), and\n"
        f"  still +{evals(h_sai)[h_steps] - evals(h_adamw)[h_steps]:.2f} after {h_steps} steps.\n"
        f"- **Speed:** an optimizer step costs {step['ratio_to_sgd_fused']:.2f}x torch's fused SGD and "
        f"{step['ratio_to_adamw_fused']:.2f}x fused AdamW\n"
        f"  (GPT-2 {step['size']} shapes, CPU, weight decay {step['weight_decay']:g})."
    )


#: name -> (JSON it reads, renderer).
BLOCKS: dict[str, Callable[[str], str]] = {
    "bench-cpu.json": bench_summary,
    "gpt2-seeds": per_seed_table,
    "horizon": horizon_table,
    "lora-grid": grid_table,
    "lora-seeds": per_seed_table,
    "gpt2-124m-lr": curves_table,
    "lora-r16": grid_table,
    "lora-r16/curves": lambda name: curves_table(name.split("/")[0]).split("\n\n", 1)[1],
    "lora-grid/curves": lambda name: curves_table(name.split("/")[0]).split("\n\n", 1)[1],
    "headline": headline,
}

BLOCK = re.compile(r"<!-- generated: (?P<name>\S+) -->\n.*?<!-- end generated: (?P=name) -->", re.S)


def render_readme(text: str) -> str:
    """``text`` with every generated block rewritten (an empty one filled); an unknown name is an error."""

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in BLOCKS:
            raise KeyError(f"{README.name}: unknown generated block {name!r} (known: {', '.join(BLOCKS)})")
        return f"<!-- generated: {name} -->\n{BLOCKS[name](name)}\n<!-- end generated: {name} -->"

    return BLOCK.sub(replace, text)


def expected_files() -> dict[Path, str]:
    """Every generated file's path and the contents its JSON gives."""
    files = {
        path.parent / "compare.md": compare_optimizers.compare_markdown(json.loads(path.read_text()))
        for path in sorted(HERE.glob("*/compare.json"))
    }
    for bench in sorted(HERE.glob("bench-*.json")):
        files[bench.with_suffix(".md")] = bench_optimizers.report_markdown(json.loads(bench.read_text())) + "\n"
    for readme in (README, HERE.parents[1] / "README.md"):
        files[readme] = render_readme(readme.read_text())
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a committed table differs")
    args = parser.parse_args(argv)
    stale = []
    for path, text in expected_files().items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.write_text(text)
    for path in stale:
        verb = "differs from its JSON" if args.check else "rewritten"
        print(f"{path.relative_to(HERE.parents[1])}: {verb}")
    if args.check and stale:
        print("run: python scripts/results/render.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
