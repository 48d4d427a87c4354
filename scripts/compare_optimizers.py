#!/usr/bin/env python
"""Does SGD-SaI match AdamW here? Run a recipe with several optimizers, learning rates and seeds.

    python scripts/compare_optimizers.py                      # GPT-2 offline default, full grid
    python scripts/compare_optimizers.py --config configs/llama-lora-local.yaml   # the LoRA recipe
    python scripts/compare_optimizers.py --quick              # a couple of minutes (CI smoke test)
    python scripts/compare_optimizers.py --optimizers sgd_sai,adamw_torch_fused \
        --grid sgd_sai=3e-3 --grid adamw_torch_fused=1e-3 --seeds 42,43,44        # seed spread

The recipe (``scripts/pretrain_gpt2.py`` or ``scripts/finetune_llama_lora.py``) is chosen from the
config (a config with ``lora_r`` is the LoRA recipe; ``--recipe`` overrides). Every run uses the same
recipe config, data and number of steps; only the optimizer, ``--learning_rate`` and ``--seed``
(model initialisation and data order) change. Each run is a fresh subprocess (so peak memory is per
run), in ``--out_dir/runs/<name>-lr<lr>-seed<seed>``; ``--resume`` reuses a finished run only if
its arguments, the config file's contents, the code (sai_hf, the recipe, this script), the package
versions, the ``SAI_HF_*``/``CC``/``OMP_NUM_THREADS`` environment and any local data or model path are
unchanged (it prints what changed otherwise). Other arguments pass through to the recipe (``--field
value``, after the config's), except those the sweep sets for every run: ``--optim``, ``--optim_args``,
``--learning_rate``, ``--seed`` and ``--output_dir`` are refused, naming what to use instead
(``--optimizers``, the config, ``--grid``, ``--seeds``, ``--out_dir``). An optimizer, learning rate
or seed given twice is refused too. Every argument is checked before any run starts or any directory
is created (the pass-through flags by parsing each optimizer's run arguments as its recipe will); a
bad one is one ``compare_optimizers.py: error: ...`` line naming it, exit status 2. Output in ``--out_dir`` (default ``outputs/compare``): ``compare.md`` (mean ± std
over seeds per optimizer and lr), ``compare.json`` (the aggregate rows, one row per run with its
seed, and every run's loss history), ``loss_curves.png`` (train and eval loss of each optimizer's
best learning rate: the seeds' mean with a ± std band) and ``lr_sensitivity.png`` (final eval loss
against learning rate, ± std bars). ``sgd_sai`` runs also track g-SNR drift
(``--gsnr_track_every``, default every quarter of the run): the table's last column says how far
the blocks' g-SNR moved from the one their scales were fixed with.

Optimizers are ``--optim`` names, plus ``sgd_sai_sqrt_numel``: ``sgd_sai`` with
``scale_rule=sqrt_numel`` (sqrt(numel) in place of each block's g-SNR, the authors' later variant;
the ablation of what the g-SNR adds), and ``sgd_sai_max``: ``sgd_sai`` with ``normalize=max`` (the
paper's scales, divided by the largest g-SNR; its rates are about that g-SNR times larger).

Learning-rate grids (``--grid`` overrides, e.g. ``--grid sgd_sai=1e-4,1e-3``), GPT-2 recipe:

* ``sgd_sai``, ``sgd_sai_sqrt_numel``  3e-4, 1e-3, 3e-3, 1e-2
* ``sgd_sai_max``                      0.3, 1, 3, 10
* ``adamw_torch_fused``, ``adam_mini``  3e-4, 1e-3, 3e-3
* ``sgd`` (momentum 0.9)               1e-2, 3e-2, 1e-1, 3e-1

LoRA recipe: ``sgd_sai`` and ``sgd_sai_sqrt_numel`` 3e-3 .. 3e-1, ``adamw_torch_fused`` and
``adam_mini`` 1e-4 .. 1e-2, ``sgd`` 3e-2 .. 1 (factors of ~3).
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import importlib
import json
import math
import os
import re
import statistics
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from dataclasses import dataclass
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "scripts") not in sys.path:  # the recipe scripts and measurements.py, imported by name
    sys.path.insert(0, str(ROOT / "scripts"))

#: Learning-rate grid of each optimizer (name -> lrs), per recipe.
DEFAULT_GRIDS: dict[str, list[float]] = {
    "sgd_sai": [3e-4, 1e-3, 3e-3, 1e-2],
    "sgd_sai_sqrt_numel": [3e-4, 1e-3, 3e-3, 1e-2],
    "sgd_sai_max": [0.3, 1.0, 3.0, 10.0],
    "adamw_torch_fused": [3e-4, 1e-3, 3e-3],
    "adam_mini": [3e-4, 1e-3, 3e-3],
    "sgd": [1e-2, 3e-2, 1e-1, 3e-1],
}
LORA_GRIDS: dict[str, list[float]] = {
    "sgd_sai": [3e-3, 1e-2, 3e-2, 1e-1, 3e-1],
    "sgd_sai_sqrt_numel": [3e-3, 1e-2, 3e-2, 1e-1, 3e-1],
    "sgd_sai_max": [0.3, 1.0, 3.0, 10.0, 30.0],
    "adamw_torch_fused": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
    "adam_mini": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
    "sgd": [3e-2, 1e-1, 3e-1, 1.0],
}
#: Optimizers run by default (``--optimizers``).
DEFAULT_OPTIMIZERS = ("sgd_sai", "adamw_torch_fused", "adam_mini", "sgd")
#: Recipe scripts (``--recipe``), each with its default grids.
RECIPES: dict[str, tuple[str, dict[str, list[float]]]] = {
    "gpt2": ("pretrain_gpt2", DEFAULT_GRIDS),
    "lora": ("finetune_llama_lora", LORA_GRIDS),
}
#: Comparison names that are an ``--optim`` with extra ``--optim_args`` (added to the config's).
VARIANTS: dict[str, tuple[str, str]] = {
    "sgd_sai_sqrt_numel": ("sgd_sai", "scale_rule=sqrt_numel"),
    "sgd_sai_max": ("sgd_sai", "normalize=max"),
}
#: ``--optim_args`` of each optimizer. The recipe config's own ``optim_args`` are meant for its
#: ``optim`` (SGD-SaI in the shipped configs), so ``sgd_sai`` keeps them and every other optimizer
#: gets these (none, unless listed).
OPTIM_ARGS: dict[str, str] = {"sgd": "momentum=0.9"}


def optim_overrides(name: str, config_optim_args: str | None = None) -> list[str]:
    """``--optim`` and ``--optim_args`` of comparison ``name``: ``sgd_sai`` keeps the config's
    ``optim_args`` (no override), a :data:`VARIANTS` entry adds its own to them, any other optimizer
    gets :data:`OPTIM_ARGS`."""
    optim, added = VARIANTS.get(name, (name, ""))
    if optim != "sgd_sai":
        return ["--optim", optim, "--optim_args", OPTIM_ARGS.get(optim, "")]
    if not added:
        return ["--optim", optim]
    return ["--optim", optim, "--optim_args", ",".join(filter(None, [config_optim_args, added]))]


def recipe_of(config: dict[str, Any], choice: str | None) -> str:
    """``--recipe`` if given, else ``lora`` for a config with ``lora_r`` and ``gpt2`` otherwise."""
    if choice is not None:
        return choice
    return "lora" if "lora_r" in config else "gpt2"


#: ``--quick``: a tiny model for a few steps, the lowest and highest point of each grid (per recipe).
QUICK_SCHEDULE = [
    "--tokenizer_vocab_size", "512", "--corpus_max_files", "30", "--max_steps", "12", "--warmup_steps", "2",
    "--eval_steps", "6", "--logging_steps", "2", "--per_device_train_batch_size", "8", "--max_eval_samples", "16",
    "--eval_on_start", "true",
]  # fmt: skip
QUICK_OVERRIDES: dict[str, list[str]] = {
    "gpt2": ["--n_layer", "2", "--n_embd", "64", "--n_head", "2", "--block_size", "64", *QUICK_SCHEDULE],
    "lora": [
        "--hidden_size", "32", "--intermediate_size", "64", "--num_hidden_layers", "1", "--num_attention_heads", "2",
        "--num_key_value_heads", "1", "--base_pretrain_steps", "3", "--block_size", "96", "--lora_r", "4",
        "--lora_alpha", "8", *QUICK_SCHEDULE,
    ],
}  # fmt: skip


# ----------------------------------------------------------------------------- one run (child)
def mean_example_tokens(dataset: Any, block_size: int) -> float:
    """Tokens an example holds on average: ``block_size`` for packed blocks, the mean length (before
    padding) of prompt/completion examples, which are cut at ``block_size`` but not filled to it."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    return statistics.fmean(lengths) if lengths else float(block_size)


def _single_run(spec: dict[str, Any]) -> None:
    """Child process: one recipe run, then its measurements as JSON on ``spec["result"]``."""
    from transformers import TrainerCallback
    from transformers import trainer as trainer_module

    class StepTimer(TrainerCallback):
        """Wall time of the training steps alone (evaluations excluded) and the largest optimizer-state
        bytes, of the last training in the process (the LoRA recipe may first pretrain its base)."""

        def __init__(self) -> None:
            self.on_train_begin()

        def on_train_begin(self, *args, **kwargs):
            self.seconds = 0.0
            self.state_bytes = 0
            self.param_bytes = 0
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, optimizer=None, model=None, **kwargs):
            self.seconds += time.perf_counter() - self._start
            # the largest state of the run (deferred blocks, e.g. LoRA's lora_A, get theirs after step 1)
            self.state_bytes = max(self.state_bytes, optimizer_state_bytes(optimizer))
            if state.global_step == 1:
                self.param_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)

    from measurements import optimizer_state_bytes

    timer = StepTimer()
    trainer_module.DEFAULT_CALLBACKS.append(timer)  # every Trainer of this process reports to it
    recipe = importlib.import_module(spec["recipe_module"])

    result = recipe.main(spec["argv"])
    args = result.trainer.args
    examples = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    tokens = examples * mean_example_tokens(result.trainer.train_dataset, spec["block_size"])
    out = {
        "argv": spec["argv"],
        "optim": spec["optim"],
        "learning_rate": spec["learning_rate"],
        "seed": spec["seed"],
        "metrics": result.metrics,
        "log_history": result.trainer.state.log_history,
        "state_bytes": timer.state_bytes,
        "param_bytes": timer.param_bytes,
        "train_tokens": tokens,
        "tokens_per_second": tokens / timer.seconds if timer.seconds else float("nan"),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    _write_atomically(Path(spec["result"]), json.dumps(out, default=float))


# ----------------------------------------------------------------------------- the sweep (parent)
def parse_grid(
    items: Sequence[str], optimizers: Sequence[str], defaults: dict[str, list[float]] = DEFAULT_GRIDS
) -> dict[str, list[float]]:
    """``defaults`` restricted to ``optimizers``, with ``name=lr,lr`` overrides.

    ``ValueError`` naming the item for an unknown name, a name given twice, no learning rate, a value
    that is not a finite number >= 0, or a learning rate given twice (also two values that print the
    same, ``%g``: their runs would share a directory and a table row, and the repeat would be counted
    as another seed)."""
    grids = {name: list(defaults.get(name, [1e-3])) for name in optimizers}
    overridden: set[str] = set()
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or name not in grids:
            raise ValueError(f"--grid {item!r}: expected NAME=LR[,LR...] with NAME one of {list(grids)}")
        if name in overridden:
            raise ValueError(f"--grid {item!r}: {name} is given twice; list all its learning rates in one --grid")
        overridden.add(name)
        try:
            lrs = [float(v) for v in values.split(",") if v.strip()]
        except ValueError as err:
            raise ValueError(f"--grid {item!r}: {err}") from None
        if not lrs:
            raise ValueError(f"--grid {item!r}: no learning rate")
        bad = [lr for lr in lrs if not (math.isfinite(lr) and lr >= 0)]
        if bad:
            raise ValueError(f"--grid {item!r}: learning rate {bad[0]!r} is not a finite number >= 0")
        labels = [f"{lr:g}" for lr in lrs]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(
                f"--grid {item!r}: learning rate {repeated[0]} is given twice; each point runs once per seed "
                "(use --seeds for repeats)"
            )
        grids[name] = lrs
    return grids


def parse_optimizers(text: str) -> list[str]:
    """``--optimizers a,b`` as a list; ``ValueError`` for an empty list or a name given twice (its runs
    would be counted as extra seeds of one point)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError(f"--optimizers {text!r}: no optimizer named")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"--optimizers {text!r}: {repeated[0]} is given twice; each optimizer runs once per lr and seed")
    odd = [name for name in names if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name)]
    if odd:  # the name becomes a directory name under --out_dir/runs
        raise ValueError(f"--optimizers {text!r}: {odd[0]!r} is not an optimizer name (letters, digits, '_', '.', '-')")
    known = known_optimizers()
    unknown = [name for name in names if name not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"--optimizers {text!r}: unknown optimizer {unknown[0]!r}{hint}; use a transformers --optim name "
            f"(e.g. sgd_sai, adamw_torch_fused, sgd) or {', '.join(VARIANTS)}"
        )
    return names


def known_optimizers() -> set[str]:
    """The names ``--optimizers`` accepts: transformers' ``--optim`` names (with ``sgd_sai`` and ``adam_mini``,
    registered by ``import sai_hf``) and the :data:`VARIANTS`."""
    import sai_hf  # noqa: F401  (registers sgd_sai and adam_mini as --optim names)
    from transformers.training_args import OptimizerNames

    return {name.value for name in OptimizerNames} | set(VARIANTS)


#: Recipe flags the sweep sets itself for every run, and what to use instead of passing them through.
SWEEP_FLAGS: dict[str, str] = {
    "--optim": "--optimizers (comparison names)",
    "--optim_args": "the config's optim_args (kept by sgd_sai) or a variant name such as sgd_sai_sqrt_numel",
    "--learning_rate": "--grid NAME=LR[,LR...]",
    "--seed": "--seeds",
    "--output_dir": "--out_dir (each run writes to OUT_DIR/runs/NAME-lrLR-seedSEED)",
}


def check_pass_through(tokens: Sequence[str]) -> None:
    """``ValueError`` for a pass-through recipe argument that the sweep sets itself (it would override
    the sweep's value while the report kept the sweep's label), naming the flag and what to use instead."""
    for token in tokens:
        flag = token.split("=", 1)[0]
        if flag in SWEEP_FLAGS:
            raise ValueError(f"{flag} is set by the sweep for every run; use {SWEEP_FLAGS[flag]}")


@dataclass(frozen=True)
class Sweep:
    """What every run of one comparison shares."""

    config: str
    recipe: str
    out_dir: Path
    extra: Sequence[str]
    block_size: int
    config_optim_args: str | None = None
    gsnr_track_every: int = 0
    resume: bool = False


#: Recipe fields that may name local files or directories whose contents shape a run.
PATH_FIELDS = ("train_file", "validation_file", "dataset_name", "model_name_or_path", "tokenizer_name", "gguf_file")
#: Environment variables that change what a run computes (besides ``SAI_HF_*``).
ENV_VARIABLES = ("CC", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "PYTHONHASHSEED")
#: Packages whose versions are part of a run's identity.
PACKAGES = ("torch", "transformers", "accelerate", "datasets", "tokenizers", "peft", "adam-mini", "triton", "gguf")


def _digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(str(path).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _path_identity(value: Any) -> Any:
    """Size and modification time of a local file (or of every file under a local directory); ``None``
    for a value that is not a local path (a Hub id)."""
    path = Path(str(value)).expanduser()
    if path.is_file():
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    if path.is_dir():
        return sorted([str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns] for f in path.rglob("*") if f.is_file())
    return None


def gguf_identity(fields: dict[str, Any]) -> Any:
    """Size and modification time of the GGUF file the run would load (found as the recipe finds it:
    in ``gguf_package``, in ``model_name_or_path`` or at ``gguf_file``), or ``None``."""
    from types import SimpleNamespace

    from sai_hf.recipes.gguf import gguf_path

    if not fields.get("gguf_file"):
        return None
    try:
        location = gguf_path(SimpleNamespace(**fields))
    except (ImportError, OSError):
        return None
    return [str(location), _path_identity(location)] if isinstance(location, Path) else list(location)


def run_fingerprint(sweep: Sweep, argv: Sequence[str]) -> dict[str, Any]:
    """Everything that shapes a run besides its arguments: the config file's contents, the code (sai_hf,
    the recipe script, this script), package versions, the environment variables that change what
    is computed, and local data or model paths (size and mtime). ``--resume`` reuses a run only if
    this and its arguments are unchanged."""
    from importlib import metadata

    config = load_config(sweep.config)
    overrides = {field: _last_override(sweep.extra, f"--{field}", config.get(field)) for field in PATH_FIELDS}
    gguf_package = _last_override(sweep.extra, "--gguf_package", config.get("gguf_package"))
    versions = {}
    for package in (*PACKAGES, *([gguf_package] if gguf_package else [])):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    code = sorted((ROOT / "sai_hf").rglob("*.py")) + sorted((ROOT / "sai_hf").rglob("*.c"))
    code += [ROOT / "scripts" / f"{RECIPES[sweep.recipe][0]}.py", Path(__file__).resolve()]
    return {
        "argv": list(argv),
        "config_sha256": hashlib.sha256(Path(sweep.config).read_bytes()).hexdigest(),
        "code_sha256": _digest(code),
        "python": sys.version,
        "packages": versions,
        "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith("SAI_HF_") or k in ENV_VARIABLES},
        "paths": {field: [value, _path_identity(value)] for field, value in overrides.items() if value is not None},
        "gguf": gguf_identity({**overrides, "gguf_package": gguf_package}),
    }


def load_config(path: str) -> dict[str, Any]:
    from sai_hf.recipes.config import load_yaml_config

    return load_yaml_config(path)


def _reusable(result_file: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The finished run in ``result_file`` if it was made with ``fingerprint``; else ``None``, saying why."""
    if not result_file.is_file():
        return None
    try:
        previous = json.loads(result_file.read_text())
    except (OSError, ValueError) as err:
        print(f"[compare] not reusing {result_file}: unreadable ({err})", flush=True)
        return None
    before = previous.get("fingerprint") if isinstance(previous, dict) else None
    if not isinstance(before, dict):
        print(f"[compare] not reusing {result_file}: written without a fingerprint (an older version)", flush=True)
        return None
    changed = [key for key in fingerprint if before.get(key) != fingerprint[key]]
    if changed:
        print(f"[compare] not reusing {result_file}: changed since: {', '.join(changed)}", flush=True)
        return None
    return previous


def run_directory(sweep: Sweep, optim: str, lr: float, seed: int) -> Path:
    """Where the run of one (optimizer, lr, seed) point writes: ``OUT_DIR/runs/NAME-lrLR-seedSEED``."""
    return sweep.out_dir / "runs" / f"{optim}-lr{lr:g}-seed{seed}"


def run_arguments(sweep: Sweep, optim: str, lr: float, seed: int) -> list[str]:
    """The recipe's ``argv`` for one point: the config, the sweep's flags, then the pass-through ones;
    ``sgd_sai`` runs (and its variants) also track g-SNR drift every ``sweep.gsnr_track_every`` steps."""
    extra = list(sweep.extra)
    overrides = optim_overrides(optim, sweep.config_optim_args)
    if overrides[1] == "sgd_sai" and sweep.gsnr_track_every:
        extra += ["--gsnr_track_every", str(sweep.gsnr_track_every)]
    return [
        sweep.config, *overrides, "--learning_rate", repr(lr), "--seed", str(seed),
        "--output_dir", str(run_directory(sweep, optim, lr, seed)),
        "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no", *extra,
    ]  # fmt: skip


def run_one(sweep: Sweep, optim: str, lr: float, seed: int) -> dict[str, Any]:
    """Run one (optimizer, lr, seed) point in a fresh interpreter and return its measurements.

    ``sgd_sai`` runs (and its variants) also track g-SNR drift every ``sweep.gsnr_track_every``
    steps (0: off). With ``sweep.resume``, a finished run of the same arguments is reused instead."""
    run_dir = run_directory(sweep, optim, lr, seed)
    result_file = run_dir / "result.json"
    argv = run_arguments(sweep, optim, lr, seed)
    spec = {
        "argv": argv, "optim": optim, "learning_rate": lr, "seed": seed, "result": str(result_file),
        "block_size": sweep.block_size, "recipe_module": RECIPES[sweep.recipe][0],
    }  # fmt: skip
    fingerprint = run_fingerprint(sweep, argv)
    if sweep.resume:
        previous = _reusable(result_file, fingerprint)
        if previous is not None:
            print(f"[compare] reusing {result_file} (same arguments, config, code and environment)", flush=True)
            return previous
    run_dir.mkdir(parents=True, exist_ok=True)
    result_file.unlink(missing_ok=True)  # a failed run must not leave an older result to reuse
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log = run_dir / "log.txt"
    with log.open("w") as fh:
        proc = subprocess.run(
            [sys.executable, __file__, "--_run", json.dumps(spec)], stdout=fh, stderr=subprocess.STDOUT, env=env
        )
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"run {optim} lr={lr:g} failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
    result = json.loads(result_file.read_text())
    result["fingerprint"] = fingerprint
    _write_atomically(result_file, json.dumps(result, default=float))
    return result


def _write_atomically(path: Path, text: str) -> None:
    """``path`` holds ``text`` or its previous contents, never a truncated file."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def eval_losses(run: dict[str, Any]) -> list[tuple[int, float]]:
    return [(h["step"], h["eval_loss"]) for h in run["log_history"] if "eval_loss" in h]


def train_losses(run: dict[str, Any]) -> list[tuple[int, float]]:
    return [(h["step"], h["loss"]) for h in run["log_history"] if "loss" in h]


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run: best and final eval loss, perplexity, tokens/s, memory, seed."""
    rows = []
    for run in runs:
        evals = [loss for _, loss in eval_losses(run)]
        final = run["metrics"]["eval_loss"]
        rows.append(
            {
                "optim": run["optim"],
                "learning_rate": run["learning_rate"],
                "seed": run.get("seed"),
                "best_eval_loss": min(evals + [final]),
                "final_eval_loss": final,
                "perplexity": perplexity(final),
                "tokens_per_second": run["tokens_per_second"],
                "state_bytes": run["state_bytes"],
                "state_over_params": run["state_bytes"] / run["param_bytes"] if run["param_bytes"] else float("nan"),
                "peak_rss_mb": run["peak_rss_mb"],
                **last_drift(run),
            }
        )
    return rows


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (0 for one value) of ``values``; NaN mean if any is not finite."""
    if not values or not all(math.isfinite(v) for v in values):
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (optimizer, lr): the per-run rows' means, the final eval loss's std and seeds."""
    grouped: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault((row["optim"], row["learning_rate"]), []).append(row)
    out = []
    for (optim, lr), members in grouped.items():
        final, final_std = mean_std([r["final_eval_loss"] for r in members])
        best, _ = mean_std([r["best_eval_loss"] for r in members])
        first = members[0]
        out.append(
            {
                **{k: v for k, v in first.items() if k.startswith("drift_")},
                "optim": optim,
                "learning_rate": lr,
                "seeds": [r["seed"] for r in members],
                "final_eval_loss": final,
                "final_eval_loss_std": final_std,
                "best_eval_loss": best,
                "perplexity": perplexity(final),
                "tokens_per_second": statistics.fmean(r["tokens_per_second"] for r in members),
                "state_bytes": first["state_bytes"],
                "state_over_params": first["state_over_params"],
                "peak_rss_mb": max(r["peak_rss_mb"] for r in members),
            }
        )
    return out


def perplexity(loss: float) -> float:
    from sai_hf.recipes.metrics import perplexity as recipe_perplexity

    return recipe_perplexity(loss) if math.isfinite(loss) else float("nan")


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
    """Each optimizer's (aggregate) row with the lowest mean final eval loss."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["optim"] not in best or _key(row) < _key(best[row["optim"]]):
            best[row["optim"]] = row
    return best


def _key(row: dict[str, Any]) -> float:
    value = row["final_eval_loss"]
    return value if math.isfinite(value) else float("inf")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The aggregate rows as a table (best lr of each optimizer marked)."""
    best = best_per_optimizer(rows)
    lines = [
        "| optimizer | lr | seeds | final eval loss (mean ± std) | best eval loss | perplexity | tokens/s "
        "| optimizer state | state / params | peak RSS | g-SNR drift at the end (Spearman / max / median ratio) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in sorted(rows, key=lambda r: (r["optim"], r["learning_rate"])):
        mark = " **(best)**" if best[row["optim"]] is row else ""
        spread = f" ± {row['final_eval_loss_std']:.3f}" if len(row["seeds"]) > 1 else ""
        lines.append(
            f"| {row['optim']}{mark} | {row['learning_rate']:g} | {len(row['seeds'])} | "
            f"{row['final_eval_loss']:.3f}{spread} | {row['best_eval_loss']:.3f} | {row['perplexity']:.1f} | "
            f"{row['tokens_per_second']:.0f} | {row['state_bytes'] / 2**20:.2f} MiB | {row['state_over_params']:.2f}x | "
            f"{row['peak_rss_mb']:.0f} MB | {drift_cell(row)} |"
        )
    return "\n".join(lines)


def separations(rows: list[dict[str, Any]]) -> list[str]:
    """For each pair of optimizers' best rows run with several seeds: is the difference of their
    mean final eval losses larger than the sum of their stds (the seed spread)?"""
    best = sorted(best_per_optimizer(rows).values(), key=_key)
    out = []
    for i, a in enumerate(best):
        for b in best[i + 1 :]:
            if len(a["seeds"]) < 2 or len(b["seeds"]) < 2:
                continue
            gap = b["final_eval_loss"] - a["final_eval_loss"]
            spread = a["final_eval_loss_std"] + b["final_eval_loss_std"]
            verdict = "larger than" if gap > spread else "within"
            out.append(
                f"{a['optim']} (lr {a['learning_rate']:g}) vs {b['optim']} (lr {b['learning_rate']:g}): "
                f"{gap:+.3f}, {verdict} the seed spread ({spread:.3f} = sum of the stds)"
            )
    return out


def compare_markdown(report: dict[str, Any]) -> str:
    """``compare.md`` from ``compare.json``'s contents: the table, then the seed-spread checks
    (``scripts/results/render.py --check`` compares committed tables with this)."""
    return markdown_table(report["rows"]) + "\n" + "".join(f"\n- {line}" for line in report["separations"]) + "\n"


def provenance() -> dict[str, Any]:
    """Where a result was produced: date (UTC), commit (``+dirty`` with local changes), CPU, torch."""
    import torch

    from measurements import cpu_name, git_commit

    return {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "commit": git_commit(ROOT),
        "machine": f"{os.cpu_count()} CPUs, {cpu_name()}",
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def drift_cell(row: dict[str, Any]) -> str:
    if "drift_spearman" not in row:
        return "-"
    return (
        f"{row['drift_spearman']:.2f} / {row['drift_max_ratio']:.1f}x / {row['drift_median_ratio']:.2f}x "
        f"(step {row['drift_step']})"
    )


def mean_curve(runs: list[dict[str, Any]], curve: Any) -> tuple[list[int], list[float], list[float]]:
    """Steps every run logged in ``curve(run)``, with the runs' mean and std there."""
    points = [dict(curve(run)) for run in runs]
    steps = sorted(set.intersection(*(set(p) for p in points))) if points else []
    stats = [mean_std([p[s] for p in points]) for s in steps]
    return steps, [m for m, _ in stats], [sd for _, sd in stats]


def plot(runs: list[dict[str, Any]], rows: list[dict[str, Any]], out_dir: Path, title: str) -> list[Path]:
    """``loss_curves.png`` (best lr of each optimizer: seed mean, ± std band) and ``lr_sensitivity.png``."""
    from sai_hf.plots import figure, save_figure

    try:
        fig, ax = figure((8, 5))
    except ImportError:
        print("matplotlib not installed: no plots (pip install 'sai-hf[plots]')")
        return []
    best = best_per_optimizer(rows)
    colors = {name: f"C{i}" for i, name in enumerate(sorted(best))}
    shown: list[float] = []  # the plotted eval losses
    for name, row in sorted(best.items()):
        chosen = [r for r in runs if r["optim"] == name and r["learning_rate"] == row["learning_rate"]]
        label = f"{name} lr={row['learning_rate']:g}" + (f" ({len(chosen)} seeds)" if len(chosen) > 1 else "")
        steps, mean, std = mean_curve(chosen, train_losses)
        ax.plot(steps, mean, color=colors[name], alpha=0.45, lw=1)
        steps, mean, std = mean_curve(chosen, eval_losses)
        if steps:
            shown += [m for m in mean if math.isfinite(m)]
            ax.plot(steps, mean, "o-", color=colors[name], label=f"{label} (eval)")
            if len(chosen) > 1:
                low = [m - s for m, s in zip(mean, std)]
                high = [m + s for m, s in zip(mean, std)]
                ax.fill_between(steps, low, high, color=colors[name], alpha=0.2)
    if shown:  # a training-loss spike would flatten every other curve: keep to the evaluations' range
        ax.set_ylim(top=min(ax.get_ylim()[1], 1.05 * max(shown)))
    curves = save_figure(
        fig, ax, out_dir / "loss_curves.png", xlabel="step", ylabel="loss (faint: train, markers: eval; band: ± std)",
        title=f"{title}: best learning rate of each optimizer",
    )  # fmt: skip

    fig, ax = figure((7, 5))
    for name in sorted(best):
        points = sorted((r["learning_rate"], r["final_eval_loss"], r["final_eval_loss_std"]) for r in rows if r["optim"] == name)
        lrs, losses, stds = zip(*points)
        ax.errorbar(lrs, losses, yerr=[s if math.isfinite(s) else 0 for s in stds], fmt="o-", color=colors[name], label=name, capsize=3)
    ax.set_xscale("log")
    sensitivity = save_figure(
        fig, ax, out_dir / "lr_sensitivity.png", xlabel="learning rate", ylabel="final eval loss (± std over seeds)",
        title=f"{title}: learning-rate sensitivity",
    )  # fmt: skip
    return [curves, sensitivity]


PROG = "compare_optimizers.py"


@dataclass(frozen=True)
class Plan:
    """A checked comparison: what every run shares, the points to run, and the arguments as given."""

    sweep: Sweep
    optimizers: list[str]
    grids: dict[str, list[float]]
    seeds: list[int]
    argv: list[str]


def command_line_parser() -> argparse.ArgumentParser:
    """The sweep's own flags; the rest pass through to the recipe."""
    # no abbreviations: --seed (a recipe flag) must not be read as --seeds, nor --optim as --optimizers
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--config", default=str(ROOT / "configs" / "gpt2-local.yaml"), help="recipe config")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default=None, help="default: from the config")
    parser.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS), help="comma-separated names")
    parser.add_argument("--grid", action="append", default=[], metavar="NAME=LR,LR", help="override a grid")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the config's seed)")
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
    return parser


def plan(argv: Sequence[str] | None = None) -> Plan:
    """Parse and check ``argv`` (default ``sys.argv[1:]``), running and creating nothing.

    ``ValueError`` (``FileNotFoundError``) naming the flag, value or file for anything a run would fail
    on or misreport: a refused or misspelt pass-through flag (checked by parsing each optimizer's run
    arguments as its recipe will), an unknown or repeated optimizer, a bad grid, seed list or config."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = command_line_parser().parse_known_args(argv)
    check_pass_through(overrides)
    check_sweep_flags(args)
    optimizers = parse_optimizers(args.optimizers)
    config = checked_config(args.config)
    recipe = recipe_of(config, args.recipe)
    grids = parse_grid(args.grid, optimizers, RECIPES[recipe][1])
    if args.quick:
        check_quick(config, overrides, args.config)
        grids = {name: [lrs[0], lrs[-1]] if len(lrs) > 1 else lrs for name, lrs in grids.items()}
    seeds = parse_seeds(args.seeds, config.get("seed", 42))
    sweep = sweep_of(args, config, recipe, overrides)
    check_run_arguments(sweep, optimizers, grids, seeds)
    return Plan(sweep, optimizers, grids, seeds, argv)


def check_quick(config: dict[str, Any], overrides: Sequence[str], config_path: str) -> None:
    """``--quick`` shrinks a model built from the config's size fields; ``ValueError`` for a config (or
    flags) that loads pretrained weights, which it cannot shrink (it would run the real model)."""
    for field in ("gguf_file", "model_name_or_path"):
        value = _last_override(overrides, f"--{field}", config.get(field))
        if value:
            raise ValueError(
                f"--quick shrinks a model built from the config's sizes, but {config_path} loads pretrained weights "
                f"({field}: {value}); run it with --max_steps and --max_eval_samples instead"
            )


def check_sweep_flags(args: argparse.Namespace) -> None:
    """``ValueError`` naming ``--max_steps`` below 1 (the Trainer would train by epochs), a negative
    ``--gsnr_track_every``, or an ``--out_dir`` that cannot be a directory."""
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max_steps {args.max_steps}: expected a number of steps >= 1")
    if args.gsnr_track_every is not None and args.gsnr_track_every < 0:
        raise ValueError(f"--gsnr_track_every {args.gsnr_track_every}: expected a number of steps >= 0 (0: off)")
    for existing in (args.out_dir, *args.out_dir.parents):
        if existing.exists():
            if not existing.is_dir():
                where = "" if existing == args.out_dir else f": {str(existing)!r}"
                raise ValueError(f"--out_dir {str(args.out_dir)!r}{where} is not a directory")
            return


def checked_config(path: str) -> dict[str, Any]:
    """The ``--config`` mapping; ``ValueError`` naming ``--config`` when it is not a file (the loader's own,
    naming the file, when it is not a recipe config)."""
    if not Path(path).is_file():
        what = "a directory" if Path(path).is_dir() else "no such file"
        raise ValueError(f"--config {path!r}: {what}; expected a recipe YAML config")
    return load_config(path)


def sweep_of(args: argparse.Namespace, config: dict[str, Any], recipe: str, overrides: Sequence[str]) -> Sweep:
    """What every run shares: the pass-through flags (after ``--quick``'s, then ``--max_steps``), and the
    block size and drift-tracking period as the recipe reads them from the config and those flags."""
    extra = (QUICK_OVERRIDES[recipe] if args.quick else []) + list(overrides)
    if args.max_steps is not None:
        extra += ["--max_steps", str(args.max_steps)]
    fields = recipe_fields(recipe, [args.config, "--output_dir", str(args.out_dir), *extra])
    max_steps = fields["max_steps"]
    default_every = max(1, max_steps // 4) if max_steps > 0 else 0
    track_every = args.gsnr_track_every if args.gsnr_track_every is not None else default_every
    return Sweep(
        args.config, recipe, args.out_dir, extra, fields["block_size"], config.get("optim_args"), track_every, args.resume
    )


def recipe_argument_types(recipe: str) -> tuple[type, ...]:
    """The argument dataclasses ``recipe``'s script parses (its ``ARGUMENTS``)."""
    return importlib.import_module(RECIPES[recipe][0]).ARGUMENTS


def recipe_fields(recipe: str, argv: Sequence[str]) -> dict[str, Any]:
    """``argv`` (a config, then ``--field value`` flags) parsed as ``recipe`` parses it, loading no data:
    every field's value. ``ValueError`` naming a misspelt, ill-typed or out-of-range field."""
    from sai_hf.recipes.config import parse_recipe_args

    fields: dict[str, Any] = {}
    for arguments in parse_recipe_args(argv, recipe_argument_types(recipe), prog=f"{RECIPES[recipe][0]}.py"):
        fields.update(vars(arguments))
    return fields


def check_run_arguments(
    sweep: Sweep, optimizers: Sequence[str], grids: dict[str, list[float]], seeds: Sequence[int]
) -> None:
    """Parse each optimizer's first run's arguments as its recipe will (its ``--optim``, ``--optim_args``
    with the config's, drift tracking): ``ValueError`` naming the optimizer for one its recipe refuses."""
    for optim in optimizers:
        try:
            recipe_fields(sweep.recipe, run_arguments(sweep, optim, grids[optim][0], seeds[0]))
        except ValueError as err:
            raise ValueError(f"the {optim} runs' recipe arguments: {err}") from None


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the comparison ``argv`` asks for (default ``sys.argv[1:]``) and return its report. Bad input
    raises before any run or directory (:func:`plan`); :func:`cli` is the command line's version."""
    return run_sweep(plan(argv))


def cli(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """:func:`main` for the command line: bad input is one ``compare_optimizers.py: error: ...`` line and
    exit status 2 (as in the recipes), before any run starts or any directory is created."""
    from sai_hf.recipes.training import prepare_or_exit

    return run_sweep(prepare_or_exit(plan, argv, PROG))


def run_sweep(checked: Plan) -> dict[str, Any]:
    """Run every (optimizer, lr, seed) point of ``checked``, write ``compare.{json,md}`` and the plots, and
    return the report."""
    sweep, grids, seeds = checked.sweep, checked.grids, checked.seeds
    sweep.out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    started = time.perf_counter()
    for optim in checked.optimizers:
        for lr in grids[optim]:
            for seed in seeds:
                print(f"[compare] {optim} lr={lr:g} seed={seed} ...", flush=True)
                runs.append(run_one(sweep, optim, lr, seed))
    per_run = summarize(runs)
    rows = aggregate(per_run)
    table = markdown_table(rows)
    spreads = separations(rows)
    report = {
        "config": sweep.config,
        "recipe": sweep.recipe,
        "overrides": list(sweep.extra),
        "grids": grids,
        "seeds": seeds,
        "gsnr_track_every": sweep.gsnr_track_every,
        "rows": rows,
        "per_run": per_run,
        "separations": spreads,
        "runs": runs,
        "wall_seconds": time.perf_counter() - started,
        "command": " ".join([PROG, *checked.argv]),
        "provenance": provenance(),
    }
    (sweep.out_dir / "compare.json").write_text(json.dumps(report, indent=1, default=float))
    (sweep.out_dir / "compare.md").write_text(compare_markdown(report))
    title = "LoRA recipe" if sweep.recipe == "lora" else "GPT-2 recipe"
    pictures = plot(runs, rows, sweep.out_dir, title)
    print(table)
    for line in spreads:
        print(f"- {line}")
    print(f"[compare] {len(runs)} runs in {report['wall_seconds'] / 60:.1f} min; results in {sweep.out_dir}")
    for path in pictures:
        print(f"[compare] wrote {path}")
    return report


#: Seeds ``transformers.set_seed`` accepts (NumPy's range).
SEED_RANGE = range(0, 2**32)


def parse_seeds(text: str | None, default: int) -> list[int]:
    """``--seeds 1,2,3`` as ints (the config's seed when not given); ``ValueError`` naming ``--seeds`` for
    a value that is not an integer, a repeat, or a seed outside :data:`SEED_RANGE`."""
    if text is None:
        return [int(default)]
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected comma-separated integers") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: expected distinct integers")
    outside = [seed for seed in seeds if seed not in SEED_RANGE]
    if outside:
        raise ValueError(f"--seeds {text!r}: seed {outside[0]} is outside 0 .. 2**32 - 1")
    return seeds


def _last_override(tokens: Sequence[str], flag: str, default: Any) -> Any:
    """The value of the last ``flag VALUE`` or ``flag=VALUE`` in ``tokens``, else ``default``."""
    value = default
    for i, token in enumerate(tokens):
        if token == flag and i + 1 < len(tokens):
            value = tokens[i + 1]
        elif token.startswith(flag + "="):
            value = token[len(flag) + 1 :]
    return value


if __name__ == "__main__":
    if sys.argv[1:2] == ["--_run"]:  # a child started by run_one: one recipe run
        _single_run(json.loads(sys.argv[2]))
    else:
        cli()
