"""``make test-frameworks``: LLaMA-Factory and axolotl train with ``sgd_sai``, offline, in their own virtualenvs.

Opt-in (not run by CI: it installs two frameworks, several minutes and several GB). For each framework it

1. creates ``.venv-frameworks/<framework>/`` (kept between runs; ``--fresh`` recreates it), installs torch first
   (axolotl: ``torch==2.13.0``, the CPU wheel; LLaMA-Factory: ``torch==2.14.1`` and ``torchvision==0.29.1``, see
   :data:`FRAMEWORKS`), then the framework with torch held there, then this checkout of sai-hf (editable);
2. builds, with that virtualenv's transformers, a tiny random Llama (2 layers, width 64), a byte-level BPE tokenizer
   (``sai_hf.recipes.tokenizer.train_bpe_tokenizer``) and a 64-example Alpaca-format JSON data set (sums:
   ``"Add 3 and 4."`` -> ``"7"``) in ``.venv-frameworks/work/<framework>/``;
3. runs a LoRA SFT with ``sgd_sai`` through the framework's own command, with its config from configs/frameworks/
   (paths relative to that work directory), in one process and in two (gloo on the CPU):

   - LLaMA-Factory: ``python -m sai_hf.run -m llamafactory.cli train llamafactory_sft.yaml``, then the same with
     ``FORCE_TORCHRUN=1 NPROC_PER_NODE=2`` (LLaMA-Factory starts its own ``torchrun``);
   - axolotl (the plugin ``sai_hf.axolotl.SGDSaIPlugin``, no launcher): ``python -m axolotl.cli.train
     axolotl_sft.yaml``, then ``axolotl train axolotl_sft.yaml -- --config_file configs/accelerate/cpu-ddp.yaml``
     (an ``accelerate launch`` subprocess; on the CPU with configs/frameworks/axolotl_cpu_ddp.py);

   and once more with ``optim_args`` misspelt, which must fail naming the key before the framework prepares its data.

It prints each run as it ends and a table: exit status, wall time, the first and last logged losses, whether
``gsnr.json`` was written (SGD-SaI's scales: it trained with sai-hf's optimizer), and the versions each framework
resolved (a transformers outside sai-hf's declared range is flagged). Exit status 1 if a run did not do what it
should. Logs: ``.venv-frameworks/work/<framework>/<run>.log``.

    python scripts/test_frameworks.py [--only llamafactory|axolotl] [--fresh] [--max-steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / ".venv-frameworks"
CONFIGS = REPO / "configs" / "frameworks"


@dataclass(frozen=True)
class Run:
    """One training command: ``argv`` (``{python}``, ``{bin}``, ``{config}``, ``{repo}`` filled in), extra ``env``,
    ``overrides`` of top-level config keys (``key: value`` lines); ``fails_with``: the run must fail, saying this."""

    name: str
    processes: int
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, str] = field(default_factory=dict)
    fails_with: str | None = None


@dataclass(frozen=True)
class Framework:
    """A framework: its requirement, the torch build its virtualenv gets first (``torch``), its config in
    configs/frameworks/, its runs, the files from configs/frameworks/ copied beside the config (``support``), and
    what its log says when it starts preparing the data (``data_started``)."""

    name: str
    requirement: str
    torch: tuple[str, ...]
    config: str
    runs: tuple[Run, ...]
    data_started: str
    support: tuple[str, ...] = ()


LLAMAFACTORY_TRAIN = ("{python}", "-m", "sai_hf.run", "-m", "llamafactory.cli", "train", "{config}")
BAD_OPTIM_ARGS = "--optim_args for sgd_sai: unknown key 'momentun'"
FRAMEWORKS = {
    "llamafactory": Framework(
        "llamafactory",
        "llamafactory==0.9.5",
        # LLaMA-Factory imports torchaudio (llamafactory/data/mm_plugin.py); PyPI's newest, 2.11.1, is linked against
        # torch's CUDA libraries and cannot load beside the CPU wheel of torch 2.13. torch 2.14.1 (CUDA build, on
        # this machine's disk) runs on the CPU as well.
        ("torch==2.14.1", "torchvision==0.29.1"),
        "llamafactory_sft.yaml",
        (
            Run("1-process", 1, LLAMAFACTORY_TRAIN),
            Run("2-process", 2, LLAMAFACTORY_TRAIN, {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}),
            Run("bad-optim_args", 1, LLAMAFACTORY_TRAIN, overrides={"optim_args": "momentun=0.9"}, fails_with=BAD_OPTIM_ARGS),
        ),
        data_started="Running tokenizer on dataset",
    ),
    "axolotl": Framework(
        "axolotl",
        "axolotl==0.19.0",
        ("torch==2.13.0",),
        "axolotl_sft.yaml",
        (
            Run("1-process", 1, ("{python}", "-m", "axolotl.cli.train", "{config}")),
            Run("2-process", 2, ("{bin}/axolotl", "train", "{config}", "--", "--config_file",
                                 "{repo}/configs/accelerate/cpu-ddp.yaml", "--num_processes", "2"),
                overrides={"plugins": "[sai_hf.axolotl.SGDSaIPlugin, axolotl_cpu_ddp.CPUDeviceMapPlugin]"}),
            Run("bad-optim_args", 1, ("{python}", "-m", "axolotl.cli.train", "{config}"),
                overrides={"optim_args": "{momentun: 0.9}"}, fails_with=BAD_OPTIM_ARGS),
        ),  # fmt: skip
        data_started="Tokenizing Prompts",
        support=("axolotl_cpu_ddp.py",),
    ),
}

#: What every run gets: offline, quiet, one thread per process (2 cores), no telemetry.
RUN_ENV = {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1", "WANDB_DISABLED": "true", "WANDB_MODE": "disabled", "DO_NOT_TRACK": "1",
    "AXOLOTL_DO_NOT_TRACK": "1", "DISABLE_VERSION_CHECK": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "",
}  # fmt: skip

LOSS = re.compile(r"'loss': '?([0-9.]+(?:e[-+]?\d+)?)")


def run_command(argv: list[str], log: Path, **kwargs) -> int:
    """Run ``argv``, its output to ``log``; its exit status."""
    with log.open("w") as out:
        return subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, **kwargs).returncode


def install(framework: Framework, fresh: bool) -> Path:
    """The framework's virtualenv, created and installed if needed; its python."""
    venv = ROOT / framework.name
    if fresh and venv.exists():
        shutil.rmtree(venv)
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    constraint = ROOT / f"{framework.name}-torch.txt"  # torch stays what was installed first
    constraint.write_text("\n".join(framework.torch) + "\n")
    log = ROOT / f"{framework.name}-install.log"
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    for step in (list(framework.torch), ["-c", str(constraint), framework.requirement], ["-c", str(constraint), "-e", str(REPO)]):
        started = time.monotonic()
        if run_command([*pip, *step], log) != 0:
            sys.exit(f"test_frameworks: pip install {' '.join(step)} failed; see {log}")
        print(f"[{framework.name}] pip install {' '.join(step)}: {time.monotonic() - started:.0f} s", flush=True)
    return python


def make_assets(work: Path) -> None:
    """The tiny model, tokenizer and data set in ``work`` (run with the framework's python: its transformers)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sai_hf.recipes.tokenizer import train_bpe_tokenizer

    examples = [{"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)} for a in range(8) for b in range(8)]
    (work / "data").mkdir(parents=True, exist_ok=True)
    (work / "data" / "tiny_alpaca.json").write_text(json.dumps(examples, indent=1))
    (work / "data" / "dataset_info.json").write_text(json.dumps({"tiny_alpaca": {"file_name": "tiny_alpaca.json"}}))
    texts = [f"{e['instruction']} {e['output']}" for e in examples] * 4
    tokenizer = train_bpe_tokenizer(texts, vocab_size=320)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(work / "tiny-llama")
    tokenizer.save_pretrained(work / "tiny-llama")


def versions(python: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('torch', 'transformers', 'accelerate', 'peft', 'trl', 'datasets')}))")  # fmt: skip
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_framework(framework: Framework, python: Path, max_steps: int) -> list[dict]:
    work = ROOT / "work" / framework.name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, **RUN_ENV, "PATH": f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # as activated
    env.pop("PYTHONPATH", None)  # the framework's virtualenv, nothing of this one
    subprocess.run([str(python), __file__, "--make-assets", str(work)], check=True, env=env, capture_output=True)
    for name in framework.support:
        shutil.copy(CONFIGS / name, work / name)
    results = []
    for run in framework.runs:
        output_dir = work / "out" / run.name
        config = work / f"{run.name}.yaml"  # the checked-in config with this run's output_dir, max_steps, overrides
        text = (CONFIGS / framework.config).read_text()
        for key, value in {"output_dir": str(output_dir), "max_steps": str(max_steps), **run.overrides}.items():
            text, count = re.subn(rf"(?m)^{key}: .*$", f"{key}: {value}", text)
            assert count == 1, f"{framework.config} has no single top-level line '{key}: ...'"
        config.write_text(text)
        fill = {"python": str(python), "bin": str(python.parent), "config": str(config), "repo": str(REPO)}
        argv = [part.format(**fill) for part in run.argv]
        log = work / f"{run.name}.log"
        started = time.monotonic()
        status = run_command(argv, log, cwd=work, env={**env, **run.env})
        seconds = time.monotonic() - started
        output = log.read_text()
        losses = [float(x) for x in LOSS.findall(output)]
        result = {
            "framework": framework.name, "run": run.name, "processes": run.processes, "status": status,
            "seconds": round(seconds, 1), "loss_lines": len(losses), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "gsnr_json": (output_dir / "gsnr.json").exists(),
            "command": " ".join(run.argv), "env": run.env, "overrides": run.overrides, "log": str(log),
        }  # fmt: skip
        if run.fails_with is None:
            result["ok"] = status == 0 and result["gsnr_json"] and bool(losses)
        else:  # refused with the message, before the data was prepared
            result["data_prepared"] = framework.data_started in output
            result["ok"] = status != 0 and run.fails_with in output and not result["data_prepared"]
        results.append(result)
        print(json.dumps(result), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(FRAMEWORKS), action="append", help="a framework (repeatable); default both")
    parser.add_argument("--fresh", action="store_true", help="recreate the virtualenvs")
    parser.add_argument("--max-steps", type=int, default=10, help="training steps per run (default 10)")
    parser.add_argument("--make-assets", metavar="DIR", help=argparse.SUPPRESS)  # step 2, in the framework's python
    args = parser.parse_args(argv)
    if args.make_assets:
        make_assets(Path(args.make_assets))
        return 0
    if args.max_steps < 1:
        parser.error(f"--max-steps must be >= 1, got {args.max_steps}")
    ROOT.mkdir(exist_ok=True)
    declared = re.search(r'"transformers([^"]*)"', (REPO / "pyproject.toml").read_text()).group(1)
    results = []
    for name in args.only or sorted(FRAMEWORKS, reverse=True):
        framework = FRAMEWORKS[name]
        python = install(framework, args.fresh)
        resolved = versions(python)
        inside = Version(resolved["transformers"]) in SpecifierSet(declared)
        print(f"[{name}] {framework.requirement} resolved: {resolved}; transformers {resolved['transformers']} is "
              f"{'inside' if inside else 'OUTSIDE'} sai-hf's declared transformers{declared}", flush=True)  # fmt: skip
        results += run_framework(framework, python, args.max_steps)
    print("\nframework     run             procs  status  seconds  losses (first -> last, lines)  gsnr.json  ok")
    for r in results:
        losses = f"{r['first_loss']} -> {r['last_loss']} ({r['loss_lines']})" if r["loss_lines"] else "none logged"
        print(f"{r['framework']:<13} {r['run']:<15} {r['processes']:>5}  {r['status']:>6}  {r['seconds']:>7}  "
              f"{losses:<30} {'yes' if r['gsnr_json'] else 'no':<10} {'ok' if r['ok'] else 'FAILED'}")  # fmt: skip
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
