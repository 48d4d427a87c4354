#!/usr/bin/env python
"""Write every table of ``scripts/results/`` from the JSON of the run that produced it.

    python scripts/results/render.py           # rewrite the tables
    python scripts/results/render.py --check   # exit 1, naming each table that differs from its JSON

What it writes:

* ``<dir>/compare.md`` for every ``<dir>/compare.json`` (``compare_optimizers.compare_markdown``, the
  function the comparison itself writes it with);
* ``bench-cpu.md`` from ``bench-cpu.json`` (``bench_optimizers.report_markdown``, what the benchmark
  prints and writes as ``bench.md``);
* in ``scripts/results/README.md``, ``lr_find.md``, ``zero_memory.md`` and the top-level ``README.md``
  (:func:`pages`), every block between ``<!-- generated: NAME -->`` and ``<!-- end generated: NAME -->``,
  by the renderer ``NAME`` of :data:`BLOCKS` (a provenance line and a table built from the JSON:
  ``<dir>/compare.json``, ``bench-cpu.json``, ``zero_memory.json``, ``zero_cpu_step.json``,
  ``lr_find/<case>/lr_find.json``).

Text outside the blocks is prose: it quotes the tables but is not checked.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import textwrap
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
    "zero_memory.json": {"date": "2026-12-02", "commit": "7174b04"},
    "zero_cpu_step.json": {"date": "2026-12-02", "commit": "7174b04"},
    "lr_find/gpt2-sai": {"date": "2026-12-02", "commit": "d861b76"},
    "lr_find/gpt2-adamw": {"date": "2026-12-02", "commit": "d861b76"},
    "lr_find/gpt2-sai-seed43": {"date": "2026-12-02", "commit": "d3a2465"},
    "lr_find/lora": {"date": "2026-12-02", "commit": "ddc816e"},
    "lr_find/lora-150steps": {"date": "2026-12-02", "commit": "ddc816e"},
    "lr_find/lora-r16": {"date": "2026-12-02", "commit": "25fb3a0"},
    "lr_find/lora-r16-150steps": {"date": "2026-12-02", "commit": "25fb3a0"},
    "lr_find/gpt2-124m": {"date": "2026-12-02", "commit": "0227025"},
    "lr_find/gpt2-124m-short": {"date": "2026-12-02", "commit": "9b49f75"},
    "lr_find/gpt2-350m": {"date": "2026-12-02", "commit": "9b49f75"},
    "lr_find/gpt2-774m": {"date": "2026-12-02", "commit": "71dba5d"},
    "lr_find/gpt2-1.5b": {"date": "2026-12-02", "commit": "71dba5d"},
    "lr_find/smollm2-lora": {"date": "2026-12-08", "commit": "d4b0d77"},  # the tree it ran from
}

#: Figures with no JSON, kept as measured and printed with *typed* after them: the first GPT-2
#: learning-rate grid (final eval loss at 200 steps by lr; its runs' ``compare.json`` was not kept,
#: README.md here, "GPT-2 pretraining: learning-rate grid (typed)"), and the machine of the range
#: tests (``lr_find.json`` does not record it).
TYPED: dict[str, Any] = {
    "gpt2-grid": {
        "steps": 200,
        "sgd_sai": {3e-4: 6.102, 1e-3: 5.728, 3e-3: 5.481, 1e-2: 6.492},
        "adamw_torch_fused": {3e-4: 5.719, 1e-3: 5.199, 3e-3: 5.727},
    },
    "lr_find machine": "2 CPU cores shared with three other jobs (load 5-6); the GPT-2 124M cases: a 2-core AMD EPYC"
    " shared with the width study (load 4); SmolLM2: a 2-core AMD EPYC shared with two training runs (load 3)",
    "lr_find/lora seconds": "3.6 min with data loading",
    "lr_find/lora-r16 seconds": "8.6 min with data loading, load 4",
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


#: GPT-2 runs from before 2026-12-02 logged the mean token cross-entropy × 127/128 (results README, "GPT-2 losses
#: before 2026-12-02"); the headline shows them on today's scale, the one a user's own run prints.
GPT2_LOSS_RESCALE = 128 / 127


def smollm2_lora_bullet(seeds: dict[str, Any], grid: dict[str, Any]) -> str:
    """The headline's SmolLM2 LoRA line: SGD-SaI against AdamW at their best rates over 3 seeds (a tie where the gap is
    within the sum of the two seed stds), and Adam-mini's grid best where its seeds have not run."""
    sai, adamw = (compare_optimizers.best_per_optimizer(seeds["rows"])[o] for o in ("sgd_sai", "adamw_torch"))
    gap = sai["final_eval_loss"] - adamw["final_eval_loss"]
    spread = sai["final_eval_loss_std"] + adamw["final_eval_loss_std"]
    leader = "SGD-SaI" if gap < 0 else "AdamW"
    verdict = "a tie with AdamW" if abs(gap) <= spread else f"{leader} ahead by {abs(gap):.3f} nats ({abs(gap) / spread:.1f}x the seed spread)"
    start = sorted({round(evals(r)[0], 3) for r in grid["runs"] if 0 in evals(r)})[0]
    text = (
        f"**LoRA fine-tuning of SmolLM2-135M-Instruct, a pretrained Llama: {verdict}; SGD-SaI keeps half the optimizer"
        f" state.** Final eval loss {sai['final_eval_loss']:.3f} ± {sai['final_eval_loss_std']:.3f} (SGD-SaI, lr"
        f" {sai['learning_rate']:g}) against {adamw['final_eval_loss']:.3f} ± {adamw['final_eval_loss_std']:.3f} (AdamW,"
        f" lr {adamw['learning_rate']:g}), 3 seeds each at its best rate of a 4-point grid, 300 steps of r=16 adapters"
        f" from {start:.3f}."
    )
    mini = compare_optimizers.best_per_optimizer(grid["rows"] + seeds["rows"]).get("adam_mini")
    if mini is not None:
        tried = sorted({r["learning_rate"] for r in grid["rows"] if r["optim"] == "adam_mini"})
        runs = f"{len(mini['seeds'])} seeds" if len(mini["seeds"]) > 1 else f"seed {mini['seeds'][0]}, the best of the {len(tried)} rates run so far"
        text += f" Adam-mini: {mini['final_eval_loss']:.3f} ({runs})."
    return textwrap.fill(text, width=100, initial_indent="- ", subsequent_indent="  ", break_on_hyphens=False) + "\n"


def headline(_: str) -> str:
    """The top-level README's measured results, from the SmolLM2 LoRA and GPT-2 seed sweeps, the 1000-step
    run and the benchmark (what a newcomer reads first must not drift from its runs either)."""
    def best(report: dict[str, Any], optim: str) -> dict[str, Any]:
        return compare_optimizers.best_per_optimizer(report["rows"])[optim]

    def loss(row: dict[str, Any], scale: float = 1.0) -> str:
        return f"{row['final_eval_loss'] * scale:.3f} ± {row['final_eval_loss_std'] * scale:.3f}"

    gpt2, horizon, bench = load("gpt2-seeds"), load("horizon"), load("bench-cpu.json")
    g_sai, g_adamw = best(gpt2, "sgd_sai"), best(gpt2, "adamw_torch_fused")
    h_sai, h_adamw = (next(r for r in horizon["runs"] if r["optim"] == o) for o in ("sgd_sai", "adamw_torch_fused"))
    h_steps = max(evals(h_sai))
    step = next(r for r in bench["results"] if r["optimizer"] == "sgdsai" and r["weight_decay"] > 0)
    return (
        smollm2_lora_bullet(load("smollm2-lora-seeds"), load("smollm2-lora"))
        + f"- **Small-model pretraining: SGD-SaI trails AdamW.** A 4.2M-parameter GPT-2: {loss(g_sai, GPT2_LOSS_RESCALE)}\n"
        f"  against AdamW's {loss(g_adamw, GPT2_LOSS_RESCALE)} after {max(evals(gpt2['runs'][0]))} steps "
        f"(+{(g_sai['final_eval_loss'] - g_adamw['final_eval_loss']) * GPT2_LOSS_RESCALE:.2f} nats, many times the seed\n"
        f"  spread), and still +{(evals(h_sai)[h_steps] - evals(h_adamw)[h_steps]) * GPT2_LOSS_RESCALE:.2f} after {h_steps} steps. "
        f"These runs predate 2026-12-02: their losses are\n"
        f"  shown × 128/127, the scale `make quickstart` prints now.\n"
        f"- **Speed:** an optimizer step costs {step['ratio_to_sgd_fused']:.2f}x torch's fused SGD and "
        f"{step['ratio_to_adamw_fused']:.2f}x fused AdamW\n"
        f"  (GPT-2 {step['size']} shapes, CPU, weight decay {step['weight_decay']:g})."
    )


def command_provenance(command: str, machine: str, recorded: dict[str, str]) -> str:
    """The provenance line of a result whose JSON holds its whole command line (not a ``scripts/`` one)."""
    return f"Command: `{command}`. Machine: {machine}. Date: {recorded['date']}. Commit: `{recorded['commit'][:7]}`."


def zero_machine(machine: dict[str, Any]) -> str:
    return (
        f"{machine['cpu']}, {machine['cores']} cores, accelerator {machine['accelerator']}; torch {machine['torch']}, "
        f"DeepSpeed {machine['deepspeed']}, transformers {machine['transformers']}"
    )


ZERO_STAGES = {
    "zero2": "ZeRO-2",
    "zero2_offload": "ZeRO-2 + `offload_optimizer`",
    "zero3": "ZeRO-3",
    "zero3_offload_optimizer": "ZeRO-3 + `offload_optimizer`",
    "zero3_offload_all": "ZeRO-3 + `offload_optimizer` + `offload_param`",
}
ZERO_OPTIMIZERS = ("adamw", "sgd_sai_fp32", "sgd_sai_bf16")


def zero_bytes(report: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """stage -> optimizer -> its row of ``zero_memory.json``."""
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for row in report["rows"]:
        rows.setdefault(row["stage"], {})[row["optimizer"]] = row
    return rows


def zero_memory_table(name: str) -> str:
    """Bytes per parameter of each optimizer's state, the fp32 master and gradient partitions, per stage."""
    report = load("zero_memory.json")
    rows = zero_bytes(report)
    cells = []
    for stage, by_optim in rows.items():
        first = by_optim[ZERO_OPTIMIZERS[0]]
        cells.append(
            [
                ZERO_STAGES.get(stage, stage),
                "CPU" if first["where"] == "cpu" else first["where"],
                *(f"{by_optim[o]['optimizer_state_bytes_per_param']:.2f}" for o in ZERO_OPTIMIZERS),
                f"{first['fp32_master_bytes_per_param']:.2f}",
                f"{first['fp32_grad_partition_bytes_per_param']:.2f}" if first["fp32_grad_partition_bytes_per_param"] else "0",
            ]
        )
    header = ["stage", "where", "AdamW state", "SGD-SaI state (fp32 momentum)", "SGD-SaI state (bf16 momentum)", "fp32 master (all)", "fp32 grad partition (all)"]
    params = {row["params"] for row in report["rows"]}
    adamw = max(row["optimizer_state_bytes_per_param"] for row in report["rows"] if row["optimizer"] == "adamw")
    total = {o: rows["zero3"][o]["optimizer_state_bytes_per_param"] + rows["zero3"][o]["fp32_master_bytes_per_param"] for o in ZERO_OPTIMIZERS}
    machine = zero_machine(report["machine"])
    return (
        command_provenance(report["command"], machine, RECORDED[name])
        + f"\n\nA bf16 GPT-2 of {report['layers']} layers, width {report['width']}: "
        + " / ".join(f"{p:,}" for p in sorted(params))
        + f" parameters, {report['world_size']} ranks.\n\n"
        + table(header, cells).replace("| --- | --- | --- | --- | --- | --- | --- |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |")
        + f"\n\n(AdamW: {adamw:.10f}, its per-tensor `step` counters.) Optimizer state plus fp32 master:"
        + f" AdamW {total['adamw']:.0f} B/parameter, SGD-SaI {total['sgd_sai_fp32']:.0f}"
        + f" ({total['sgd_sai_fp32'] / total['adamw']:.2f} of AdamW's), SGD-SaI with bf16 momentum {total['sgd_sai_bf16']:.0f}"
        + f" ({total['sgd_sai_bf16'] / total['adamw']:.2f})."
    )


#: The projection's model: Llama-3.1-8B's parameter count, and the GPUs of the multi-GPU rows.
LLAMA_8B_PARAMS = 8.03e9
LLAMA_8B_GPUS = 8


def zero_memory_llama_8b(_: str) -> str:
    """Memory of a Llama-3.1-8B full fine-tune from the measured bytes per parameter (GB = 1e9 bytes);
    the bf16 weights (2 B) and gradients (2 B) follow DeepSpeed's layout, not measured."""
    zero3 = zero_bytes(load("zero_memory.json"))["zero3_offload_all"]
    n, gpus = LLAMA_8B_PARAMS, LLAMA_8B_GPUS

    def row(label: str, per_param: Callable[[dict[str, Any]], float]) -> list[str]:
        return [label, *(f"{per_param(zero3[o]) * n / 1e9:.1f} GB" for o in ZERO_OPTIMIZERS)]

    def kept(r: dict[str, Any]) -> float:
        return r["optimizer_state_bytes_per_param"] + r["fp32_master_bytes_per_param"]

    rows = [
        row(f"{gpus} GPUs, ZeRO-3: optimizer state + fp32 master per GPU", lambda r: kept(r) / gpus),
        row(f"{gpus} GPUs, ZeRO-3: + bf16 weights and gradients (2 + 2 B / {gpus}) per GPU", lambda r: (kept(r) + 4) / gpus),
        row(f"{gpus} GPUs, ZeRO-2: + full bf16 weights (2 B) and gradient partition per GPU", lambda r: (kept(r) + 2) / gpus + 2),
        row(
            "1 GPU, ZeRO-3 + optimizer and parameter offload: CPU memory (state + master + grad partition, + bf16 weights 2 B)",
            lambda r: kept(r) + r["fp32_grad_partition_bytes_per_param"] + 2,
        ),
    ]
    return table(["setup", "AdamW", "SGD-SaI", "SGD-SaI, bf16 momentum"], rows).replace("| --- | --- | --- | --- |", "| --- | ---: | ---: | ---: |")


#: Bytes one optimizer step reads and writes per fp32 entry: SGD-SaI's parameter, gradient and
#: momentum read, parameter and momentum written (20); CPUAdam's two moments on top (28).
CPU_STEP_BYTES = {"sgd_sai_fp32": 20, "deepspeed_cpu_adam": 28}


def zero_cpu_step_table(name: str) -> str:
    """Median step time of SGD-SaI (fp32 and bf16 momentum) and DeepSpeedCPUAdam per thread count."""
    report = load(name)
    runs = sorted(report["runs"].items(), key=lambda item: int(item[0].rsplit("=", 1)[-1]))
    first = runs[0][1]
    rows = []
    for key, run in runs:
        ms, ratio = run["median_seconds"], run["ratio_to_deepspeed_cpu_adam"]
        rows.append(
            [
                key.rsplit("=", 1)[-1],
                *(f"{ms[o] * 1e3:.1f} ms" for o in ("sgd_sai_fp32", "sgd_sai_bf16", "deepspeed_cpu_adam")),
                f"{ratio['sgd_sai_fp32']:.2f} (bf16: {ratio['sgd_sai_bf16']:.2f})",
            ]
        )
    header = ["threads", "SGD-SaI fp32 momentum", "SGD-SaI bf16 momentum", "DeepSpeedCPUAdam", "SGD-SaI / CPUAdam"]
    memory = first["cpu_bytes_per_entry_with_fp32_master"]
    single = first["median_seconds"]
    rate = {o: CPU_STEP_BYTES[o] * first["partition_entries"] / single[o] / 1e9 for o in CPU_STEP_BYTES}
    slowdown = [run["median_seconds"]["sgd_sai_fp32"] / single["sgd_sai_fp32"] for _, run in runs[1:]]
    machine = zero_machine(first["machine"])
    return (
        command_provenance(report["command"], machine, RECORDED[name])
        + f" Note: {report['note']}."
        + f"\n\n{first['partition_entries']:,} entries, {first['fragments']} tensor fragments, median of"
        + f" {first['repeats']} steps.\n\n"
        + table(header, rows).replace("| --- | --- | --- | --- | --- |", "| --- | ---: | ---: | ---: | ---: |")
        + f"\n\nCPU state memory with the fp32 master: SGD-SaI {memory['sgd_sai_fp32']:g} B/entry,"
        + f" {memory['sgd_sai_bf16']:g} with bf16 momentum, DeepSpeedCPUAdam {memory['deepspeed_cpu_adam']:g}."
        + f" Single-threaded, SGD-SaI moves {CPU_STEP_BYTES['sgd_sai_fp32']} B per entry at"
        + f" {rate['sgd_sai_fp32']:.1f} GB/s, CPUAdam {CPU_STEP_BYTES['deepspeed_cpu_adam']} B at"
        + f" {rate['deepspeed_cpu_adam']:.1f} GB/s (the bandwidth floor of the ratio:"
        + f" {CPU_STEP_BYTES['sgd_sai_fp32'] / CPU_STEP_BYTES['deepspeed_cpu_adam']:.2f})"
        + "".join(f"; with {key.rsplit('=', 1)[-1]} threads SGD-SaI took {s:.1f}x its single-thread time" for (key, _), s in zip(runs[1:], slowdown))
        + "."
    )


#: The range tests of ``lr_find.md``: case directory, label, the grid it is judged against
#: (``TYPED`` key or results directory, and optimizer), whether its grid row is shown.
LR_FIND_CASES = [
    ("gpt2-sai", "GPT-2 offline default, `sgd_sai`", ("gpt2-grid", "sgd_sai"), True),
    ("gpt2-sai-seed43", "same, `--seed 43` (other init and batches)", ("gpt2-grid", "sgd_sai"), False),
    ("gpt2-adamw", "GPT-2 offline default, AdamW", ("gpt2-grid", "adamw_torch_fused"), True),
    ("lora", "LoRA offline default, `sgd_sai`, default test", ("lora-grid", "sgd_sai"), True),
    ("lora-150steps", "same, `--start-lr 1e-3 --end-lr 1 --steps 150 --smooth 0.95`", ("lora-grid", "sgd_sai"), False),
    ("lora-r16", "LoRA r=16 (`--lora_r 16 --lora_alpha 32`), `sgd_sai`, default test", ("lora-r16", "sgd_sai"), True),
    ("lora-r16-150steps", "same, `--start-lr 1e-3 --end-lr 1 --steps 150 --smooth 0.95`", ("lora-r16", "sgd_sai"), False),
    ("gpt2-124m", "GPT-2 124M shape (4 x 128 tokens a step), `sgd_sai`", ("gpt2-124m-lr", "sgd_sai"), True),
    ("gpt2-124m-short", "same, `--start-lr 1e-5 --end-lr 0.1 --steps 60`", ("gpt2-124m-lr", "sgd_sai"), False),
    ("smollm2-lora", "SmolLM2-135M LoRA r=16, bf16, `--start-lr 1e-3 --end-lr 1 --steps 150 --smooth 0.95`", ("smollm2-lora", "sgd_sai"), True),
]
#: The cases of the top-level README's short table, with their labels there.
LR_FIND_SHORT_LABELS = {
    "gpt2-sai": "GPT-2 4.2M, SGD-SaI", "gpt2-adamw": "GPT-2 4.2M, AdamW",
    "lora-150steps": "LoRA r=8 (LoRA ramp)", "lora-r16-150steps": "LoRA r=16 (LoRA ramp)", "gpt2-124m": "GPT-2 124M",
}


def fmt_lr(lr: float) -> str:
    """A learning rate as the docs write it: 3e-4, 3.3e-3, 0.045, 0.1."""
    if lr >= 0.015:
        return f"{lr:.2g}"
    exponent = math.floor(math.log10(lr))
    mantissa = f"{lr / 10**exponent:.2g}"
    if mantissa == "10":
        mantissa, exponent = "1", exponent + 1
    return f"{mantissa}e{exponent}"


def lr_grid(source: str, optim: str) -> tuple[dict[float, float], int, bool]:
    """A grid's final eval loss by lr, its steps, and whether it is typed."""
    if source in TYPED:
        return TYPED[source][optim], TYPED[source]["steps"], True
    report = load(source)
    runs = [run for run in report["runs"] if run["optim"] == optim]
    losses = {row["learning_rate"]: row["final_eval_loss"] for row in report["rows"] if row["optim"] == optim}
    return losses, max(max(evals(run)) for run in runs), False


def lr_find_report(case: str) -> dict[str, Any]:
    return json.loads((HERE / "lr_find" / case / "lr_find.json").read_text())


def lr_find_table(_: str) -> str:
    """Each range test's suggestion against its grid's best learning rate."""
    rows = []
    for case, label, (source, optim), show_grid in LR_FIND_CASES:
        report = lr_find_report(case)
        losses, steps, typed = lr_grid(source, optim)
        best = min(losses, key=losses.__getitem__)
        grid = " · ".join(f"**{fmt_lr(lr)}: {loss:.3f}**" if lr == best else f"{fmt_lr(lr)}: {loss:.3f}" for lr, loss in sorted(losses.items()))
        suggestion = report.get("suggestion")
        if suggestion is None:
            found = re.search(r"noise \(([\d.]+)\).*\(from ([\d.]+), lowest ([\d.]+)\)", report.get("error", ""))
            why = f", the fall ({float(found[2]) - float(found[3]):.2f}) is below 3x the noise ({float(found[1]):.2f})" if found else ""
            suggested, ratio = f"**none**: refused{why}", "-"
        else:
            suggested = f"**{fmt_lr(suggestion)}**"
            ratio = f"{suggestion / best:.2f}" + ("" if 0.5 <= suggestion / best <= 2 else " (**outside 2x**)")
        diverged = re.search(r"diverged at lr ([\d.e+-]+)", report.get("stop_reason", ""))
        test = f"{len(report['lrs'])} steps" + (f" (diverged at {float(diverged[1]):.2g})" if diverged else "")
        test += f", {report['seconds']:.0f} s" if "seconds" in report else f", {TYPED[f'lr_find/{case} seconds']} (*typed*)"
        rows.append(
            [
                label,
                f"{grid} ({steps} steps{', *typed*' if typed else ''})" if show_grid else "(same grid)",
                fmt_lr(best),
                suggested,
                ratio,
                test,
                f"{len(losses)} runs x {steps} steps" if show_grid else "-",
            ]
        )
    header = ["case", "grid: final eval loss by lr (best in bold)", "grid best", "suggestion", "ratio", "range test", "grid"]
    recorded = {case: RECORDED[f"lr_find/{case}"] for case, *_ in LR_FIND_CASES}
    commits = ", ".join(f"`{r['commit'][:7]}` ({case})" for case, r in recorded.items())
    dates = sorted({r["date"] for r in recorded.values()})
    return (
        "Command: `python -m sai_hf.find_lr --output scripts/results/lr_find/CASE SCRIPT CONFIG [options]` (each case's"
        f" line above; its settings are in `lr_find/CASE/lr_find.json`). Machine: {TYPED['lr_find machine']} (*typed*)."
        f" Date: {', '.join(dates)}. Commit: {commits}. Grid: `lora-grid/compare.json`, the LoRA r=16 grid's"
        " `lora-r16/compare.json`, SmolLM2's `smollm2-lora/compare.json`; the GPT-2 grid is typed (its runs were not"
        " kept).\n\n" + table(header, rows)
    )


#: Range tests at the GPU configs' GPT-2 shapes (issue 22, part 4): case directory and the config it sets.
LR_FIND_SHAPES = [
    ("gpt2-124m-short", "gpt2-124m.yaml"),
    ("gpt2-350m", "gpt2-350m.yaml"),
    ("gpt2-774m", "gpt2-774m.yaml"),
    ("gpt2-1.5b", "gpt2-1.5b.yaml"),
]


def lr_find_shapes(_: str) -> str:
    """The range test at each GPU config's GPT-2 shape and the learning rate the config ships."""
    from sai_hf.recipes.config import load_yaml_config

    rows = []
    for case, config_name in LR_FIND_SHAPES:
        report = lr_find_report(case)
        config = load_yaml_config(str(HERE.parents[1] / "configs" / config_name))
        settings = report["settings"]
        suggestion = report.get("suggestion")
        diverged = re.search(r"diverged at lr ([\d.e+-]+)", report.get("stop_reason", ""))
        rows.append(
            [
                f"`{config_name}`",
                f"{config['n_layer']} x {config['n_embd']}",
                f"{fmt_lr(settings['start_lr'])} to {fmt_lr(settings['end_lr'])}, {len(report['lrs'])} of {settings['steps']} steps"
                + (f" (diverged at {float(diverged[1]):.2g})" if diverged else "") + f", {report['seconds'] / 60:.0f} min",
                fmt_lr(report["candidates"]["loss_min"]) if report.get("candidates") else "-",
                f"**{fmt_lr(suggestion)}**" if suggestion is not None else "none",
                fmt_lr(float(config["learning_rate"])),
            ]
        )
    header = ["config", "layers x width", "range test", "lowest smoothed loss at", "suggested", "config's learning_rate"]
    return table(header, rows)


def lr_find_summary(_: str) -> str:
    """The top-level README's short version of :func:`lr_find_table`: one line per case."""
    rows = []
    for case, label, (source, optim), _ in LR_FIND_CASES:
        if case not in LR_FIND_SHORT_LABELS:
            continue
        report = lr_find_report(case)
        losses, steps, _ = lr_grid(source, optim)
        best = min(losses, key=losses.__getitem__)
        suggestion = report.get("suggestion")
        ratio = "-" if suggestion is None else f"{suggestion / best:.2f}"
        seconds = f"{report['seconds'] / 60:.0f} min" if "seconds" in report else "-"
        rows.append([LR_FIND_SHORT_LABELS[case], fmt_lr(best), "refused (noise)" if suggestion is None else fmt_lr(suggestion), ratio,
                     f"{len(report['lrs'])} steps, {seconds} / {len(losses)} x {steps} steps"])  # fmt: skip
    return table(["case", "grid best", "suggested", "ratio", "test / grid"], rows)


def lr_find_rules(_: str) -> str:
    """Every rule's value on the same curves (``candidates``), against the grid's best."""
    rows = []
    rules = ["steepest_capped", "steepest", "min_div_10", "valley"]
    for case, label, (source, optim), _ in LR_FIND_CASES:
        report = lr_find_report(case)
        candidates = report.get("candidates")
        if not candidates:
            continue
        losses, _, _ = lr_grid(source, optim)
        best = min(losses, key=losses.__getitem__)
        cells = [f"{fmt_lr(candidates[r])} ({candidates[r] / best:.2f}x)" for r in rules]
        cells[rules.index(report["method"])] = f"**{cells[rules.index(report['method'])]}**"
        rows.append([f"{case} (best {fmt_lr(best)})", fmt_lr(candidates["loss_min"]), *cells])
    header = ["case", "lowest smoothed loss at", *(f"`{r}`" + (" (default)" if r == "steepest_capped" else "") for r in rules)]
    return table(header, rows)


def width_transfer_table(name: str) -> str:
    """Per rule: the best lr at each width (refined by the parabola; the grid's best in parentheses
    where they differ), its spread across widths, and the best final eval loss at each width."""
    report = json.loads((HERE / name / "width_transfer.json").read_text())
    widths = [str(w) for w in report["widths"]]
    rows = []
    for rule, entry in report["rules"].items():
        cells = []
        for w in widths:
            e = entry["widths"][w]
            grid = "" if fmt_lr(e["grid_best"]) == fmt_lr(e["refined_best"]) else f" ({fmt_lr(e['grid_best'])})"
            cells.append(fmt_lr(e["refined_best"]) + grid + ("" if e["bracketed"] else " (edge)"))
        verdict = "**yes**" if entry["transfers"] else "no"
        losses = " · ".join(f"{entry['widths'][w]['best_loss']:.3f}" for w in widths)
        rows.append([f"`{rule}` ({entry['label']})", *cells, f"{entry['spread']:.1f}x", f"{entry['exponent']:.2f}", verdict, losses])
    prov = report["provenance"][widths[0]]
    machine = f"{prov['machine']}, torch {prov['torch']}"
    commits = sorted({p["commit"][:7] for p in report["provenance"].values()})
    dates = sorted({p["date"] for p in report["provenance"].values()})
    runs = sum(len(e["losses"]) for entry in report["rules"].values() for e in entry["widths"].values())
    header = ["rule", *(f"best lr, width {w}" for w in widths), "spread", "best lr ~ width^a: a", "within 2x",
              "best eval loss, " + " · ".join(widths)]  # fmt: skip
    return (
        f"Command: `python scripts/{report['command']}` ({runs} runs of {report['max_steps']} steps; recipe"
        f" `{report['config']}` with `{' '.join(report['recipe_args'])}`). Machine: {machine}. Date: {', '.join(dates)}."
        f" Commit: {', '.join(f'`{c}`' for c in commits)}.\n\n" + table(header, rows)
    )


def width_transfer_summary(name: str) -> str:
    """The top-level README's short version of :func:`width_transfer_table`: best lr per width, spread."""
    report = json.loads((HERE / name.split("/")[0] / "width_transfer.json").read_text())
    widths = [str(w) for w in report["widths"]]
    rows = [
        [entry["label"], " · ".join(fmt_lr(entry["widths"][w]["refined_best"]) for w in widths), f"{entry['spread']:.1f}x",
         f"width^{entry['exponent']:.1f}"]
        for entry in report["rules"].values()
    ]  # fmt: skip
    return table(["rule", "best lr at width " + " · ".join(widths), "spread", "fit"], rows)


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
    "smollm2-lora": grid_table,
    "smollm2-lora-seeds": per_seed_table,
    "smollm2-lora/curves": lambda name: curves_table(name.split("/")[0]).split("\n\n", 1)[1],
    "headline": headline,
    "zero_memory.json": zero_memory_table,
    "zero_memory.json/llama-8b": zero_memory_llama_8b,
    "zero_cpu_step.json": zero_cpu_step_table,
    "lr_find": lr_find_table,
    "lr_find/rules": lr_find_rules,
    "lr_find/summary": lr_find_summary,
    "lr_find/shapes": lr_find_shapes,
    "width-transfer": width_transfer_table,
    "width-transfer/summary": width_transfer_summary,
}

BLOCK = re.compile(r"<!-- generated: (?P<name>\S+) -->\n.*?<!-- end generated: (?P=name) -->", re.S)


def pages() -> list[Path]:
    """The Markdown files with generated blocks."""
    return [README, HERE / "lr_find.md", HERE / "zero_memory.md", HERE.parents[1] / "README.md"]


def render_readme(text: str, page: str = "README.md") -> str:
    """``text`` with every generated block rewritten (an empty one filled); an unknown name is an error."""

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in BLOCKS:
            raise KeyError(f"{page}: unknown generated block {name!r} (known: {', '.join(BLOCKS)})")
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
    for page in pages():
        files[page] = render_readme(page.read_text(), page.name)
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
