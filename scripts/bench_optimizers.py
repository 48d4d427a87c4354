#!/usr/bin/env python
"""Benchmark ``sai_hf.SGDSaI`` against torch and third-party optimizers on GPT-2 parameter shapes.

For every model size (the parameter tensor shapes of GPT-2 small / medium / large / xl, read from a
``GPT2Config`` on the meta device: nothing is downloaded) and every optimizer, this measures

* the **steady-state step time**: one ``optimizer.step()`` after a warm-up step (median over
  ``--repeats`` trials);
* the **first step time** (the step that allocates the state; SGD-SaI variants also compute the
  g-SNR scales there) and its ratio to the steady-state step;
* the **construction time** of the optimizer, in the first trial and the median one (on CPU, SGD-SaI
  builds its native CPU loop there, once per process: :mod:`sai_hf.cpu_update`);
* the **optimizer-state bytes** (every tensor in ``optimizer.state``) and their ratio to the
  parameter bytes;
* on CUDA, whether a steady-state step runs under ``torch.cuda.set_sync_debug_mode("error")``
  without a host-device sync (``pass`` / ``fail``; ``n/a`` on CPU).

Fairness: every optimizer sees the same parameters and the same gradients (fixed random tensors
restored before every trial), the same ``lr`` and ``weight_decay``, and trials are interleaved
(round-robin over the optimizers in every repetition, starting one optimizer later each time).
Each trial builds a fresh optimizer and frees it afterwards, so only one optimizer's state is alive
at a time. Ratios are ratios of medians, to ``torch.optim.SGD(momentum=0.9, fused=True)`` (the floor)
and to ``torch.optim.AdamW(fused=True)``.

Usage::

    python scripts/bench_optimizers.py                      # 124M,350M on CPU (+774M,1.5B on CUDA)
    python scripts/bench_optimizers.py --quick              # tiny shapes, 3 repeats (smoke test)
    python scripts/bench_optimizers.py --optimizers sgdsai,sgd-fused,adamw-fused --threads 2
    python scripts/bench_optimizers.py --list               # the optimizer keys

Writes ``<out-dir>/bench.json`` and, when matplotlib is installed, ``<out-dir>/bench.png``.
Training throughput of whole recipe runs (tokens/s per optimizer) is ``scripts/compare_optimizers.py``'s.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import importlib.util
import inspect
import io
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # a checkout that is not pip-installed
sys.path.insert(0, str(REPO_ROOT / "scripts"))  # measurements.py, also when this file is loaded as a module
from measurements import cpu_name, git_commit, optimizer_state_bytes, tensor_bytes  # noqa: E402

# ----------------------------------------------------------------------------------- model sizes


@dataclass(frozen=True)
class ModelSize:
    """The GPT-2 configuration whose parameter shapes make up one benchmark size."""

    name: str
    n_embd: int
    n_layer: int
    n_head: int
    vocab_size: int = 50257
    n_positions: int = 1024


SIZES: dict[str, ModelSize] = {
    size.name: size
    for size in (
        ModelSize("124M", n_embd=768, n_layer=12, n_head=12),  # gpt2
        ModelSize("350M", n_embd=1024, n_layer=24, n_head=16),  # gpt2-medium
        ModelSize("774M", n_embd=1280, n_layer=36, n_head=20),  # gpt2-large
        ModelSize("1.5B", n_embd=1600, n_layer=48, n_head=25),  # gpt2-xl
        ModelSize("tiny", n_embd=64, n_layer=2, n_head=4, vocab_size=1024, n_positions=128),  # --quick
        ModelSize("mini", n_embd=128, n_layer=4, n_head=4, vocab_size=2048, n_positions=256),  # --quick
    )
}
CPU_SIZES = ("124M", "350M")
CUDA_SIZES = ("124M", "350M", "774M", "1.5B")
QUICK_SIZES = ("tiny", "mini")
QUICK_REPEATS = 3

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parameter_shapes(size: ModelSize) -> list[tuple[str, torch.Size]]:
    """Names and shapes of ``GPT2LMHeadModel``'s trainable parameters (tied ``lm_head`` counted once).

    The model is built from a config on the meta device: no weights are allocated or downloaded.
    """
    return [(name, param.shape) for name, param in meta_model(size).named_parameters()]


def decayed_names(size: ModelSize) -> set[str]:
    """The parameters ``transformers.Trainer`` applies weight decay to (its own rule: not biases,
    not LayerNorm weights), as every recipe's optimizer gets them."""
    from transformers import Trainer

    return set(Trainer.get_decay_parameter_names(None, meta_model(size)))


def meta_model(size: ModelSize) -> torch.nn.Module:
    """``GPT2LMHeadModel`` of ``size`` on the meta device."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=size.vocab_size,
        n_positions=size.n_positions,
        n_embd=size.n_embd,
        n_layer=size.n_layer,
        n_head=size.n_head,
        bos_token_id=size.vocab_size - 1,
        eos_token_id=size.vocab_size - 1,
    )
    with torch.device("meta"):
        return GPT2LMHeadModel(config)


# ----------------------------------------------------------------------------------- workload


@dataclass
class Workload:
    """Parameters with fixed random gradients, restorable so that every trial starts identically."""

    size: ModelSize
    named_params: list[tuple[str, torch.nn.Parameter]]
    initial_values: list[Tensor]
    fixed_grads: list[Tensor]
    decayed: set[str]

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """The parameters in ``transformers.Trainer``'s two groups: ``weight_decay`` on
        :func:`decayed_names`, 0 on biases and LayerNorm weights."""
        return [
            {"params": [p for n, p in self.named_params if n in self.decayed], "weight_decay": weight_decay},
            {"params": [p for n, p in self.named_params if n not in self.decayed], "weight_decay": 0.0},
        ]

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """The parameters, in model order."""
        return [param for _, param in self.named_params]

    @property
    def numel(self) -> int:
        """Number of parameter elements."""
        return sum(param.numel() for param in self.params)

    @property
    def param_bytes(self) -> int:
        """Bytes held by the parameters (not counting their gradients)."""
        return tensor_bytes(self.params)

    @torch.no_grad()
    def reset(self) -> None:
        """Restore the initial parameter values and the fixed gradients (undoing any previous step)."""
        params = self.params
        torch._foreach_copy_(params, self.initial_values)
        torch._foreach_copy_([param.grad for param in params], self.fixed_grads)


@torch.no_grad()
def build_workload(size: ModelSize, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Workload:
    """Allocate GPT-2-shaped parameters (N(0, 0.02)) and fixed N(0, 1e-3) gradients on ``device``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    named_params: list[tuple[str, torch.nn.Parameter]] = []
    initial_values: list[Tensor] = []
    fixed_grads: list[Tensor] = []
    for name, shape in parameter_shapes(size):
        value = torch.empty(shape, device=device, dtype=dtype).normal_(0.0, 0.02, generator=generator)
        grad = torch.empty(shape, device=device, dtype=dtype).normal_(0.0, 1e-3, generator=generator)
        param = torch.nn.Parameter(value.clone())
        param.grad = grad.clone()
        named_params.append((name, param))
        initial_values.append(value)
        fixed_grads.append(grad)
    return Workload(size, named_params, initial_values, fixed_grads, decayed_names(size))


# ----------------------------------------------------------------------------------- optimizers


@dataclass(frozen=True)
class Hyperparameters:
    """Hyperparameters passed to every optimizer (each keeps its own defaults for everything else)."""

    lr: float = 1e-3
    weight_decay: float = 0.1


@dataclass(frozen=True)
class OptimizerSpec:
    """One benchmarked optimizer: a CLI key, a table label and a factory over a workload."""

    key: str
    label: str
    build: Callable[[Workload], Optimizer]


SGD_FLOOR = "sgd-fused"
ADAMW_FUSED = "adamw-fused"
SGDSAI_DEFAULT = "sgdsai"

#: Optional baselines: CLI key -> (import name, distribution name, pinned version).
OPTIONAL_BASELINES = {
    "sgd-sai-official": ("sgd_sai", "sgd-sai", "1.0.3"),
    "pto-sgdsai": ("pytorch_optimizer", "pytorch_optimizer", "4.1.0"),
    "adam-mini": ("adam_mini", "adam-mini", "1.1.1"),
}


def sgdsai_variant_options() -> dict[str, tuple[str, dict[str, Any]]]:
    """Run-time variants of ``sai_hf.SGDSaI`` its signature supports: key -> (label, extra kwargs).

    Detected with :func:`inspect.signature`, not assumed: ``foreach=False`` (per-tensor loop),
    ``fused=True`` and ``momentum_dtype=torch.bfloat16``, each when the constructor accepts it.
    """
    from sai_hf import SGDSaI

    accepted = inspect.signature(SGDSaI).parameters
    candidates = {
        "sgdsai-loop": ("sai_hf.SGDSaI(foreach=False)", {"foreach": False}),
        "sgdsai-fused": ("sai_hf.SGDSaI(fused=True)", {"fused": True}),
        "sgdsai-bf16m": ("sai_hf.SGDSaI(momentum_dtype=bf16)", {"momentum_dtype": torch.bfloat16}),
    }
    return {key: option for key, option in candidates.items() if all(name in accepted for name in option[1])}


def optimizer_specs(hp: Hyperparameters) -> tuple[list[OptimizerSpec], dict[str, str]]:
    """All benchmarkable optimizers, and the optional baselines skipped (key -> reason)."""
    from sai_hf import SGDSaI

    wd, lr = hp.weight_decay, hp.lr

    def sgdsai(**extra: Any) -> Callable[[Workload], Optimizer]:
        return lambda w: SGDSaI(w.param_groups(wd), lr=lr, **extra)

    specs = [OptimizerSpec(SGDSAI_DEFAULT, "sai_hf.SGDSaI", sgdsai())]
    specs += [OptimizerSpec(key, label, sgdsai(**extra)) for key, (label, extra) in sgdsai_variant_options().items()]
    specs += [
        OptimizerSpec(
            SGD_FLOOR,
            "torch SGD(momentum=0.9, fused)",
            lambda w: torch.optim.SGD(w.param_groups(wd), lr=lr, momentum=0.9, fused=True),
        ),
        OptimizerSpec(
            ADAMW_FUSED, "torch AdamW(fused)", lambda w: torch.optim.AdamW(w.param_groups(wd), lr=lr, fused=True)
        ),
        OptimizerSpec(
            "adamw-foreach", "torch AdamW(foreach)", lambda w: torch.optim.AdamW(w.param_groups(wd), lr=lr, foreach=True)
        ),
    ]
    optional = {
        "sgd-sai-official": OptimizerSpec("sgd-sai-official", "sgd_sai.SGD_sai (official)", build_official_sgd_sai(hp)),
        "pto-sgdsai": OptimizerSpec("pto-sgdsai", "pytorch_optimizer.SGDSaI", build_pytorch_optimizer_sgdsai(hp)),
        "adam-mini": OptimizerSpec("adam-mini", "adam_mini.Adam_mini", build_adam_mini(hp)),
    }
    skipped: dict[str, str] = {}
    for key, spec in optional.items():
        module, distribution, version = OPTIONAL_BASELINES[key]
        if importlib.util.find_spec(module) is None:
            skipped[key] = f"not installed (pip install {distribution}=={version})"
        else:
            specs.append(spec)
    return specs, skipped


def build_official_sgd_sai(hp: Hyperparameters) -> Callable[[Workload], Optimizer]:
    """Factory of the official ``sgd_sai.SGD_sai`` (sgd-sai 1.0.3)."""

    def build(w: Workload) -> Optimizer:
        from sgd_sai import SGD_sai

        return SGD_sai(w.param_groups(hp.weight_decay), lr=hp.lr)

    return build


def build_pytorch_optimizer_sgdsai(hp: Hyperparameters) -> Callable[[Workload], Optimizer]:
    """Factory of ``pytorch_optimizer.SGDSaI`` (its default ``foreach=None`` path)."""

    def build(w: Workload) -> Optimizer:
        from pytorch_optimizer import SGDSaI as PtoSGDSaI

        return PtoSGDSaI(w.param_groups(hp.weight_decay), lr=hp.lr)

    return build


def build_adam_mini(hp: Hyperparameters) -> Callable[[Workload], Optimizer]:
    """Factory of ``adam_mini.Adam_mini`` with the model's ``dim`` and ``n_heads``, logs off (it takes
    named parameters and applies its own no-decay rule to biases and norms)."""

    def build(w: Workload) -> Optimizer:
        from adam_mini import Adam_mini

        return Adam_mini(
            named_parameters=w.named_params,
            lr=hp.lr,
            weight_decay=hp.weight_decay,
            dim=w.size.n_embd,
            n_heads=w.size.n_head,
            verbose=False,
        )

    return build


def select_specs(
    specs: Sequence[OptimizerSpec], wanted: str | None, skipped: dict[str, str] | None = None
) -> list[OptimizerSpec]:
    """The specs named in the comma-separated ``wanted`` (all when ``None``); ``ValueError`` for unknown
    keys (a ``skipped`` baseline with its reason) or none at all (``--optimizers ""`` is not "all")."""
    if wanted is None:
        return list(specs)
    keys = [key.strip() for key in wanted.split(",") if key.strip()]
    if not keys:
        raise ValueError(f"no optimizer named in {wanted!r}; see --list")
    known = {spec.key for spec in specs}
    unknown = [key for key in keys if key not in known]
    if unknown:
        reasons = "".join(f"; {key}: {skipped[key]}" for key in unknown if key in (skipped or {}))
        raise ValueError(f"unknown or unavailable optimizer(s) {unknown}{reasons}; available: {sorted(known)}")
    return [spec for spec in specs if spec.key in keys]


# ----------------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time of ``fn()`` in milliseconds, synchronizing the device before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def host_sync_check(optimizer: Optimizer, device: torch.device) -> str:
    """``pass`` when one ``optimizer.step()`` runs under ``set_sync_debug_mode("error")``, else ``fail``.

    ``n/a`` off CUDA (there is no host-device sync to detect).
    """
    if device.type != "cuda":
        return "n/a"
    synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        optimizer.step()
    except RuntimeError:
        return "fail"
    finally:
        torch.cuda.set_sync_debug_mode("default")
        synchronize(device)
    return "pass"


@dataclass
class Trial:
    """One fresh optimizer on a reset workload: its construction, first step, one steady-state step,
    its state size."""

    build_ms: float
    first_ms: float
    step_ms: float
    state_bytes: int
    host_syncs: str | None = None


def run_trial(spec: OptimizerSpec, workload: Workload, device: torch.device, check_syncs: bool) -> Trial:
    """Reset the workload, build the optimizer, time its first and second steps, then free it.

    Anything the optimizer prints (the official ``SGD_sai`` announces its warm-up) is swallowed.
    """
    workload.reset()
    with contextlib.redirect_stdout(io.StringIO()):
        started = time.perf_counter()
        optimizer = spec.build(workload)  # SGD-SaI builds its native CPU loop here, once per process
        build_ms = (time.perf_counter() - started) * 1e3
        first_ms = time_ms(optimizer.step, device)
        step_ms = time_ms(optimizer.step, device)
        trial = Trial(build_ms, first_ms, step_ms, optimizer_state_bytes(optimizer))
        if check_syncs:
            trial.host_syncs = host_sync_check(optimizer, device)
    alive = weakref.ref(optimizer)
    del optimizer  # frees its state now: only one optimizer's state exists at a time
    collect_if_alive(alive)
    return trial


def collect_if_alive(ref: weakref.ref) -> None:
    """Run a full ``gc.collect()`` only if a reference cycle still keeps ``ref``'s object alive."""
    if ref() is not None:
        gc.collect()


@dataclass
class Measurement:
    """All trials of one optimizer on one size and weight decay."""

    size: str
    weight_decay: float
    key: str
    label: str
    numel: int
    param_bytes: int
    build_ms: list[float] = field(default_factory=list)
    first_ms: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    state_bytes: int = 0
    host_syncs: str = "n/a"

    def add(self, trial: Trial) -> None:
        """Record one trial."""
        self.build_ms.append(trial.build_ms)
        self.first_ms.append(trial.first_ms)
        self.step_ms.append(trial.step_ms)
        self.state_bytes = trial.state_bytes
        if trial.host_syncs is not None:
            self.host_syncs = trial.host_syncs


def rotated(items: Sequence[Any], shift: int) -> list[Any]:
    """``items`` rotated left by ``shift`` (the round-robin start moves every repetition)."""
    if not items:
        return []
    shift %= len(items)
    return list(items[shift:]) + list(items[:shift])


def measure_size(
    specs: Sequence[OptimizerSpec],
    workload: Workload,
    weight_decay: float,
    device: torch.device,
    repeats: int,
    failures: dict[str, str],
    log: Callable[[str], None],
) -> list[Measurement]:
    """Interleaved trials: ``repeats`` rounds, each running every optimizer once (rotating the order).

    An optimizer that raises is dropped for this size and its error stored in ``failures``.
    """
    name = workload.size.name
    measurements = {
        spec.key: Measurement(name, weight_decay, spec.key, spec.label, workload.numel, workload.param_bytes)
        for spec in specs
    }
    name = f"{name}, weight_decay={weight_decay:g}"
    active = list(specs)
    started = time.perf_counter()
    for repeat in range(repeats):
        for spec in rotated(active, repeat):
            try:
                trial = run_trial(spec, workload, device, check_syncs=repeat == 0)
            except Exception as error:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
                failures[f"{name}/{spec.key}"] = f"{type(error).__name__}: {error}"
                active.remove(spec)
                del measurements[spec.key]
                log(f"[{name}] {spec.key} failed: {type(error).__name__}: {error}")
                continue
            measurements[spec.key].add(trial)
        log(f"[{name}] repetition {repeat + 1}/{repeats} done ({time.perf_counter() - started:.0f} s)")
    return [measurements[spec.key] for spec in specs if spec.key in measurements]


# ----------------------------------------------------------------------------------- summary


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or ``None`` when either is missing or the denominator is 0."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def first_extra_over_step(first: float, floor_first: float | None, step: float) -> float | None:
    """``(first - floor's first) / step``: what the first step costs beyond allocating the state.

    Every optimizer's first step also allocates its state, and on CPU the page faults of that
    allocation alone cost several steps (with ``THP_MEM_ALLOC_ENABLE=1`` far fewer). The difference
    to the floor's first step isolates SGD-SaI's own first-step work (the g-SNR of every block).
    """
    if floor_first is None or not step:
        return None
    return (first - floor_first) / step


def summarize(measurements: Sequence[Measurement]) -> list[dict[str, Any]]:
    """One row per (size, weight decay, optimizer): medians, ratios to the references (same size and
    weight decay), state bytes and ratio."""
    medians = {(m.size, m.weight_decay, m.key): statistics.median(m.step_ms) for m in measurements}
    first_medians = {(m.size, m.weight_decay, m.key): statistics.median(m.first_ms) for m in measurements}
    rows = []
    for m in measurements:
        setting = (m.size, m.weight_decay)
        step = medians[(*setting, m.key)]
        first = statistics.median(m.first_ms)
        rows.append(
            {
                "size": m.size,
                "weight_decay": m.weight_decay,
                "optimizer": m.key,
                "label": m.label,
                "numel": m.numel,
                "param_bytes": m.param_bytes,
                "step_ms_median": step,
                "step_ms": m.step_ms,
                "build_ms_first": m.build_ms[0],
                "build_ms_median": statistics.median(m.build_ms),
                "first_step_ms_median": first,
                "first_step_ms": m.first_ms,
                "first_over_step": ratio(first, step),
                "first_extra_over_step": first_extra_over_step(first, first_medians.get((*setting, SGD_FLOOR)), step),
                "ratio_to_sgd_fused": ratio(step, medians.get((*setting, SGD_FLOOR))),
                "ratio_to_adamw_fused": ratio(step, medians.get((*setting, ADAMW_FUSED))),
                "state_bytes": m.state_bytes,
                "state_over_param_bytes": ratio(m.state_bytes, m.param_bytes),
                "host_syncs": m.host_syncs,
            }
        )
    return rows


@dataclass(frozen=True)
class Goal:
    """A target the default ``SGDSaI`` (or a variant) is judged against."""

    optimizer: str
    metric: str
    description: str
    holds: Callable[[float], bool]


GOALS = (
    Goal(SGDSAI_DEFAULT, "ratio_to_sgd_fused", "step <= 1.10x torch SGD fused", lambda v: v <= 1.10),
    Goal(SGDSAI_DEFAULT, "ratio_to_adamw_fused", "step <= 0.80x AdamW fused", lambda v: v <= 0.80),
    Goal(SGDSAI_DEFAULT, "first_over_step", "first step <= 2x steady step", lambda v: v <= 2.0),
    Goal("sgdsai-bf16m", "ratio_to_sgd_fused", "bf16-momentum step <= 2x torch SGD fused", lambda v: v <= 2.0),
    Goal(SGDSAI_DEFAULT, "state_over_param_bytes", "state = 1.0x param bytes", lambda v: abs(v - 1.0) < 1e-3),
    Goal("sgdsai-bf16m", "state_over_param_bytes", "state = 0.5x param bytes", lambda v: abs(v - 0.5) < 1e-3),
)


def goal_checks(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Evaluate :data:`GOALS` on every size where the optimizer and the needed reference were measured."""
    checks = []
    for row in rows:
        for goal in GOALS:
            value = row[goal.metric] if row["optimizer"] == goal.optimizer else None
            if value is None:
                continue
            checks.append(
                {
                    "size": row["size"],
                    "weight_decay": row["weight_decay"],
                    "optimizer": goal.optimizer,
                    "goal": goal.description,
                    "value": value,
                    "met": bool(goal.holds(value)),
                }
            )
    return checks


# ----------------------------------------------------------------------------------- output


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    """Format a number for the table (``n/a`` for ``None``)."""
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


TABLE_COLUMNS = (
    "size",
    "weight decay",
    "optimizer",
    "step ms (median)",
    "vs SGD fused",
    "vs AdamW fused",
    "build ms (1st trial / median)",
    "first step ms",
    "first / step",
    "first - SGD's first",
    "state MiB",
    "state / params",
    "host syncs",
)


def table_cells(row: dict[str, Any]) -> list[str]:
    """One result row as the cells of :data:`TABLE_COLUMNS`."""
    return [
        row["size"],
        decay_label(row["weight_decay"]),
        row["label"],
        fmt(row["step_ms_median"], ".1f"),
        fmt(row["ratio_to_sgd_fused"], ".2f", "x"),
        fmt(row["ratio_to_adamw_fused"], ".2f", "x"),
        f'{fmt(row["build_ms_first"], ".0f")} / {fmt(row["build_ms_median"], ".0f")}',
        fmt(row["first_step_ms_median"], ".1f"),
        fmt(row["first_over_step"], ".2f", "x"),
        fmt(row["first_extra_over_step"], "+.2f", " steps"),
        fmt(row["state_bytes"] / 2**20, ".1f"),
        fmt(row["state_over_param_bytes"], ".2f", "x"),
        row["host_syncs"],
    ]


def decay_label(weight_decay: float) -> str:
    """How a weight decay was applied, for the table."""
    return f"{weight_decay:g} (HF groups)" if weight_decay else "0"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The results as a GitHub markdown table."""
    lines = [TABLE_COLUMNS, ["---"] * len(TABLE_COLUMNS), *(table_cells(row) for row in rows)]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def goals_markdown(checks: Sequence[dict[str, Any]]) -> str:
    """The goal checks as a markdown list."""
    if not checks:
        return "(no goal could be evaluated: the default SGDSaI or a reference optimizer was not run)"
    return "\n".join(
        f"- {c['size']}, weight decay {decay_label(c['weight_decay'])}, {c['optimizer']}: {c['goal']}: {c['value']:.2f} -> {'met' if c['met'] else 'NOT met'}"
        for c in checks
    )


def environment(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """What the numbers depend on: versions, device, threads, dtype, repeats, command line."""
    versions = {}
    for distribution in ("torch", "transformers", "sai-hf", "sgd-sai", "pytorch_optimizer", "adam-mini"):
        try:
            versions[distribution] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[distribution] = None
    return {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "argv": vars(args) | {"out_dir": str(args.out_dir)},
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "repeats": args.repeats,
        "load_average_1m_at_end": os.getloadavg()[0],
        # PyTorch's CPU allocator asks for transparent huge pages for large tensors when this is 1:
        # fewer page faults when the first step allocates the state.
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "sgdsai_variants": sorted(sgdsai_variant_options()),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "commit": git_commit(Path(__file__).resolve().parents[1]),
    }



def report_markdown(report: dict[str, Any]) -> str:
    """Everything printed to stdout: setup line, skipped baselines, results table, goal checks."""
    env = report["environment"]
    parts = [
        f"Optimizer step benchmark: device={env['device']} ({env['device_name']}), threads={env['threads']}, "
        f"dtype={env['dtype']}, repeats={env['repeats']} (median; interleaved), torch {env['versions']['torch']}, "
        f"THP_MEM_ALLOC_ENABLE={env.get('THP_MEM_ALLOC_ENABLE')}",
        "",
    ]
    busiest = max(env["load_average_1m_at_start"], env["load_average_1m_at_end"])
    if env["device"] == "cpu" and busiest > (env["cpu_count"] or 1):
        parts += [
            f"- warning: 1-minute load average reached {busiest:.1f} on {env['cpu_count']} CPUs: "
            "other processes were competing, times are noisy",
            "",
        ]
    for key, reason in report["skipped"].items():
        parts.append(f"- skipped {key}: {reason}")
    if report["skipped"]:
        parts.append("")
    parts += [markdown_table(report["results"]), "", "Goals (default SGDSaI):", goals_markdown(report["goals"])]
    return "\n".join(parts)


def write_plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Step time and state memory vs model size, one line per optimizer; ``None`` without matplotlib.

    ``sai_hf`` variants are drawn solid, the baselines dashed; the time axis is logarithmic.
    """
    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(13, 5))
    for label in dict.fromkeys(r["label"] for r in rows):
        series = sorted((r for r in rows if r["label"] == label), key=lambda r: r["numel"])
        sizes = [r["numel"] / 1e6 for r in series]
        style = {"marker": "o", "label": label, "linestyle": "-" if label.startswith("sai_hf") else "--"}
        ax_time.plot(sizes, [r["step_ms_median"] for r in series], **style)
        ax_mem.plot(sizes, [r["state_bytes"] / 2**30 for r in series], **style)
    ticks = {r["numel"] / 1e6: f"{r['size']}\n({r['numel'] / 1e6:.3g}M)" for r in rows}
    for ax, ylabel in ((ax_time, "steady-state step (ms, median)"), (ax_mem, "optimizer state (GiB)")):
        ax.set_xticks(list(ticks), list(ticks.values()))
        ax.set_xlabel("GPT-2 parameter shapes")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax_time.set_yscale("log")  # the optimizers span more than an order of magnitude
    ax_mem.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path



def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options (``--quick`` fills in tiny sizes and 3 repeats unless given explicitly)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        help=f"comma-separated, of {list(SIZES)} (default {','.join(CPU_SIZES)} on CPU, {','.join(CUDA_SIZES)} on CUDA)",
    )
    parser.add_argument("--repeats", type=int, help="interleaved trials per optimizer, median reported (default 7)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--threads", type=positive_int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="parameter and gradient dtype")
    parser.add_argument("--optimizers", help="comma-separated keys to run (default: all available); see --list")
    parser.add_argument("--list", action="store_true", help="list the optimizer keys and exit")
    parser.add_argument(
        "--quick", action="store_true", help=f"tiny shapes ({','.join(QUICK_SIZES)}) and {QUICK_REPEATS} repeats"
    )
    parser.add_argument("--lr", type=learning_rate, default=Hyperparameters.lr, help="learning rate given to every optimizer")
    parser.add_argument(
        "--weight-decay",
        type=weight_decays,
        default=(Hyperparameters.weight_decay, 0.0),
        help="comma-separated; each is given to every optimizer on transformers.Trainer's decay groups "
        "(biases and LayerNorm weights get 0), as the recipes run (default: 0.1,0)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=Path("outputs/bench"))
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.sizes is None:
        args.sizes = ",".join(QUICK_SIZES if args.quick else CUDA_SIZES if args.device == "cuda" else CPU_SIZES)
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else 7
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    unknown = [s for s in args.sizes.split(",") if s not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; choose from {list(SIZES)}")
    check_outputs(parser, args)
    return args


def check_outputs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A parser error (one line, exit 2) for ``--optimizers`` naming no runnable optimizer or an
    ``--out-dir`` that cannot be a directory: before the benchmark runs, not after it."""
    specs, skipped = optimizer_specs(Hyperparameters())
    try:
        select_specs(specs, args.optimizers, skipped)
    except ValueError as err:
        parser.error(f"--optimizers: {err}")
    problem = out_dir_problem(args.out_dir)
    if problem:
        parser.error(f"--out-dir {str(args.out_dir)!r}: {problem}")


def positive_int(text: str) -> int:
    """``--threads``: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def learning_rate(text: str) -> float:
    """``--lr``: a finite number >= 0 (a NaN or negative rate would fail every optimizer's constructor)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def out_dir_problem(path: Path) -> str | None:
    """Why ``path`` cannot become the output directory (it, or the nearest of its parents that exists, is
    not a directory), or ``None``: checked before the benchmark runs, not when its results are written."""
    for existing in (path, *path.parents):
        if not existing.exists():
            continue
        if existing.is_dir():
            return None
        return "exists and is not a directory" if existing == path else f"{str(existing)!r} is not a directory"
    return None


def weight_decays(text: str) -> tuple[float, ...]:
    """``--weight-decay`` values: comma-separated non-negative floats."""
    try:
        values = tuple(float(item) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative numbers, got {text!r}")
    return values


def log_stderr(message: str) -> None:
    """Progress messages go to stderr so that stdout is just the report."""
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, then list the optimizers or run the optimizer-step benchmark."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    specs, skipped = optimizer_specs(Hyperparameters(lr=args.lr))
    if args.list:
        print(list_optimizers(specs, skipped))
        return {}
    return step_benchmark(args, skipped)


def list_optimizers(specs: Sequence[OptimizerSpec], skipped: dict[str, str]) -> str:
    """``--list``: every optimizer key with its label, and the skipped baselines with the reason."""
    lines = [f"{spec.key:20s} {spec.label}" for spec in specs]
    return "\n".join(lines + [f"{key:20s} skipped: {reason}" for key, reason in skipped.items()])


def step_benchmark(args: argparse.Namespace, skipped: dict[str, str]) -> dict[str, Any]:
    """Measure every size, print the markdown report, write ``bench.json`` (and ``bench.png``); return the report."""
    device = torch.device(args.device)
    measurements: list[Measurement] = []
    failures: dict[str, str] = {}
    started = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    for size_name in args.sizes.split(","):
        workload = build_workload(SIZES[size_name], device, DTYPES[args.dtype], seed=args.seed)
        log_stderr(f"[{size_name}] {workload.numel / 1e6:.1f}M parameters in {len(workload.named_params)} tensors")
        for weight_decay in args.weight_decay:
            specs = select_specs(optimizer_specs(Hyperparameters(args.lr, weight_decay))[0], args.optimizers)
            measurements += measure_size(specs, workload, weight_decay, device, args.repeats, failures, log_stderr)
        del workload
        gc.collect()

    rows = summarize(measurements)
    report: dict[str, Any] = {
        "environment": environment(args, device) | {"load_average_1m_at_start": load_at_start},
        "skipped": skipped | {key: f"failed: {reason}" for key, reason in failures.items()},
        "results": rows,
        "goals": goal_checks(rows),
        "benchmark_seconds": time.perf_counter() - started,
    }

    args.out_dir.mkdir(parents=True, exist_ok=True)
    setup = report["environment"]
    plotted = args.weight_decay[0]  # one decay setting per plot: the first (the recipes' by default)
    plot = write_plot(
        [row for row in rows if row["weight_decay"] == plotted],
        args.out_dir / "bench.png",
        f"{setup['device_name']}, {setup['threads']} threads, {setup['dtype']}, weight decay {decay_label(plotted)}",
    )
    report["plot"] = str(plot) if plot else None
    (args.out_dir / "bench.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (args.out_dir / "bench.md").write_text(report_markdown(report) + "\n")
    print(report_markdown(report))
    log_stderr(f"wrote {args.out_dir / 'bench.json'}, bench.md" + (f" and {plot}" if plot else " (no plot: no matplotlib)"))
    return report


if __name__ == "__main__":
    main()
