"""What a hostile (or merely unlucky) user can feed sai-hf outside the optimizer itself.

The callback (an unused head, resumed runs, callbacks added by hand), errors that must name the
key, file or value before training (``--optim_args``, ``$SAI_HF_GSNR_TRACK_EVERY``, recipe YAML,
data files, ``python -m sai_hf.run``), and a newcomer's first minutes (setup, README, ``--help``).
Every test is small: a few Trainer steps of a 2-layer model at most.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from _models import TokenDataset, tiny_gpt2, training_args  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402
from transformers.trainer_callback import TrainerCallback  # noqa: E402
from transformers.trainer_optimizer import _parse_optim_args  # noqa: E402

import sai_hf  # noqa: E402
from sai_hf import GSNRCallback, find_sgd_sai  # noqa: E402
from sai_hf.callback import TRACK_EVERY_ENV  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"hostile_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _history(path: Path) -> dict:
    return json.loads(path.read_text())


def _drift_logs(trainer: Trainer) -> list[dict]:
    return [log for log in trainer.state.log_history if "gsnr_drift/spearman" in log]


@pytest.fixture(autouse=True)
def _no_track_env(monkeypatch):
    monkeypatch.delenv(TRACK_EVERY_ENV, raising=False)


# =========================================================================== 5. the callback


def _with_unused_head(model: torch.nn.Module) -> torch.nn.Module:
    model.unused_head = torch.nn.Linear(32, 3)  # registered, trainable, never in the forward pass
    return model


def test_unused_head_leaves_drift_tracking_on(tmp_path, monkeypatch):
    monkeypatch.setenv(TRACK_EVERY_ENV, "2")
    model = _with_unused_head(tiny_gpt2())
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=4), train_dataset=TokenDataset())
    trainer.train()
    assert [log["step"] for log in _drift_logs(trainer)] == [2, 4]
    assert all(log["gsnr_drift/skipped"] == 0 for log in _drift_logs(trainer))
    history = _history(tmp_path / "gsnr_history.json")
    assert history["steps"] == [1, 2, 4]
    report = json.loads((tmp_path / "gsnr.json").read_text())
    assert "unused_head.weight" not in report and set(history["blocks"]) == set(report)
    assert all(len(series) == 3 and all(math.isfinite(v) for v in series) for series in history["blocks"].values())


class _DropGradientAt(TrainerCallback):
    """Removes one block's gradient at one step, before the GSNRCallbacks after it see it."""

    def __init__(self, name: str, step: int) -> None:
        self.name, self.step = name, step

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            dict(model.named_parameters())[self.name].grad = None


def test_block_without_gradient_at_a_tracking_step_is_skipped_not_fatal(tmp_path):
    name = "transformer.wte.weight"
    callbacks = [_DropGradientAt(name, step=2), GSNRCallback(track_every=2)]
    trainer = Trainer(model=tiny_gpt2(), args=training_args(tmp_path, max_steps=4), train_dataset=TokenDataset(), callbacks=callbacks)
    trainer.train()
    logs = _drift_logs(trainer)
    assert [(log["step"], log["gsnr_drift/skipped"]) for log in logs] == [(2, 1.0), (4, 0.0)]
    history = _history(tmp_path / "gsnr_history.json")
    assert history["steps"] == [1, 2, 4]
    assert math.isnan(history["blocks"][name][1]) and math.isfinite(history["blocks"][name][2])
    assert all(len(series) == 3 for series in history["blocks"].values())


RESUME = dict(max_steps=4, save_strategy="steps", save_steps=2)


def _first_run(out: Path) -> dict:
    """4 steps tracking drift every step, checkpoints at 2 and 4; returns the history."""
    trainer = Trainer(model=tiny_gpt2(), args=training_args(out, **RESUME), train_dataset=TokenDataset(), callbacks=[GSNRCallback(track_every=1)])
    trainer.train()
    return _history(out / "gsnr_history.json")


def _resume(out: Path, checkpoint: Path, **overrides) -> Trainer:
    args = training_args(out, **{**RESUME, **overrides})
    trainer = Trainer(model=tiny_gpt2(seed=1), args=args, train_dataset=TokenDataset(), callbacks=[GSNRCallback(track_every=1)])
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return trainer


def test_resumed_run_appends_to_the_history(tmp_path):
    full = _first_run(tmp_path)
    assert full["steps"] == [1, 2, 3, 4]
    _resume(tmp_path, tmp_path / "checkpoint-2")
    resumed = _history(tmp_path / "gsnr_history.json")
    assert resumed["steps"] == [1, 2, 3, 4]  # steps 3-4 of the first run dropped, then measured again
    assert set(resumed["blocks"]) == set(full["blocks"])
    for name, series in resumed["blocks"].items():
        assert series[:2] == full["blocks"][name][:2], name  # kept from the file, not recomputed
        assert series[2:] == pytest.approx(full["blocks"][name][2:], rel=1e-4), name  # the same steps again


def test_resume_survives_a_corrupt_or_missing_history(tmp_path):
    _first_run(tmp_path)
    history = tmp_path / "gsnr_history.json"
    history.write_text("{not json")
    with pytest.warns(UserWarning, match=r"gsnr_history.json is unreadable.*continuing the g-SNR history from"):
        _resume(tmp_path, tmp_path / "checkpoint-2")
    assert (tmp_path / "gsnr_history.json.corrupt").read_text() == "{not json"
    assert _history(history)["steps"] == [1, 2, 3, 4]  # from checkpoint-2's copy

    history.unlink()
    (tmp_path / "checkpoint-2" / "gsnr_history.json").unlink()
    with pytest.warns(UserWarning, match=r"does not exist and the checkpoint holds no copy: the g-SNR drift history restarts"):
        _resume(tmp_path, tmp_path / "checkpoint-2")
    restarted = _history(history)
    assert restarted["steps"] == [1, 3, 4]
    assert all(math.isfinite(v) for series in restarted["blocks"].values() for v in series)


def test_resume_into_a_new_output_dir_writes_gsnr_json_and_continues_the_history(tmp_path):
    first = tmp_path / "first"
    _first_run(first)
    second = tmp_path / "second"
    checkpoint = first / "checkpoint-2"
    trainer = _resume(second, checkpoint, resume_from_checkpoint=str(checkpoint))  # as the recipes pass it
    assert json.loads((second / "gsnr.json").read_text()) == json.loads((first / "gsnr.json").read_text())
    assert _history(second / "gsnr_history.json")["steps"] == [1, 2, 3, 4]
    assert find_sgd_sai(trainer.optimizer) is not None

    # The automatic callback, resumed with train(resume_from_checkpoint=...) only: the report too.
    third = tmp_path / "third"
    args = training_args(third, **RESUME)
    Trainer(model=tiny_gpt2(seed=1), args=args, train_dataset=TokenDataset()).train(resume_from_checkpoint=str(checkpoint))
    assert json.loads((third / "gsnr.json").read_text()) == json.loads((first / "gsnr.json").read_text())


def test_hand_added_callbacks_each_write_their_report_and_use_their_reducer(tmp_path):
    calls = []

    def reducer(stats):
        calls.append(tuple(stats.shape))
        return stats

    callbacks = [GSNRCallback(filename="a.json", reduce_statistics=reducer), GSNRCallback(filename="b.json", track_every=2)]
    trainer = Trainer(model=tiny_gpt2(), args=training_args(tmp_path, max_steps=2), train_dataset=TokenDataset(), callbacks=callbacks)
    trainer.train()
    a, b = (json.loads((tmp_path / name).read_text()) for name in ("a.json", "b.json"))
    assert a == b and len(a) == len(list(trainer.model.parameters()))
    assert not (tmp_path / "gsnr.json").exists(), "the automatic callback stood down"
    assert len(calls) == 1, "the first hand-added callback computed the scales, with its reducer"
    assert _history(tmp_path / "b_history.json")["steps"] == [1, 2] and not (tmp_path / "a_history.json").exists()
    assert len([log for log in trainer.state.log_history if "gsnr/scale_max" in log]) == 1


def test_two_callbacks_tracking_into_one_history_file_are_refused_before_training(tmp_path):
    callbacks = [GSNRCallback(track_every=2), GSNRCallback(filename="gsnr.json", track_every=3)]
    trainer = Trainer(model=tiny_gpt2(), args=training_args(tmp_path), train_dataset=TokenDataset(), callbacks=callbacks)
    with pytest.raises(ValueError, match=r"same file .*gsnr_history.json"):
        trainer.train()
    assert trainer.state.global_step == 0 and not (tmp_path / "gsnr.json").exists()


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(track_every="5"), "track_every"),
        (dict(track_every=2.5), "track_every"),
        (dict(track_every=True), "track_every"),
        (dict(filename=""), "filename"),
        (dict(filename="x.json", history_filename="x.json"), "history_filename"),
    ],
)
def test_callback_arguments_are_checked(kwargs, key):
    with pytest.raises(ValueError, match=key):
        GSNRCallback(**kwargs)


# =========================================================================== 6. errors that name the problem


@pytest.mark.parametrize("value", ["abc", "-1", "2.5", "1e3", "true"])
def test_bad_track_every_variable_spares_other_optimizers_and_is_named_for_sgd_sai(tmp_path, monkeypatch, value):
    monkeypatch.setenv(TRACK_EVERY_ENV, value)
    Trainer(model=tiny_gpt2(), args=training_args(tmp_path, optim="adamw_torch"), train_dataset=TokenDataset())
    with pytest.raises(ValueError, match=rf"{TRACK_EVERY_ENV}='{re.escape(value)}'"):
        Trainer(model=tiny_gpt2(), args=training_args(tmp_path), train_dataset=TokenDataset())


def test_blank_track_every_variable_means_off(tmp_path, monkeypatch):
    monkeypatch.setenv(TRACK_EVERY_ENV, " ")
    trainer = Trainer(model=tiny_gpt2(), args=training_args(tmp_path, max_steps=2), train_dataset=TokenDataset())
    trainer.train()
    assert not (tmp_path / "gsnr_history.json").exists()


@pytest.mark.parametrize(
    "optim_args, named",
    [
        ("momentum=0.9,", "empty entry"),
        (",momentum=0.9", "empty entry"),
        ("momentum=0.9,,eps=1e-8", "empty entry"),
        ("   ", "blank"),
        ("momentum=0.9=1", "more than one '='"),
        ("momentum=", "'momentum' has no value"),
    ],
)
def test_optim_args_transformers_cannot_split_fail_when_the_trainer_is_built(tmp_path, optim_args, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        Trainer(model=tiny_gpt2(), args=training_args(tmp_path, optim_args=optim_args), train_dataset=TokenDataset())


@pytest.mark.parametrize("optim_args", ["momentum=0.9", " momentum = 0.8 , eps=1e-6 ", "fused=none,momentum_dtype=bf16", ""])
def test_accepted_optim_args_are_splittable_by_transformers(tmp_path, optim_args):
    args = training_args(tmp_path, optim_args=optim_args)
    Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset())  # our check accepts it ...
    _parse_optim_args(args.optim_args)  # ... and so must the parser transformers runs inside train()


# --------------------------------------------------------------------------- recipe YAML

def _parse(tmp_path: Path, text: str, finetune: bool = False):
    from sai_hf.recipes.arguments import (
        DataArguments,
        DiagnosticsArguments,
        FinetuneDataArguments,
        GPT2ModelArguments,
        LlamaModelArguments,
        LoraArguments,
    )
    from sai_hf.recipes.config import parse_recipe_args

    types = (
        (LlamaModelArguments, FinetuneDataArguments, LoraArguments, DiagnosticsArguments, TrainingArguments)
        if finetune
        else (GPT2ModelArguments, DataArguments, DiagnosticsArguments, TrainingArguments)
    )
    config = tmp_path / "config.yaml"
    config.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return parse_recipe_args([str(config), "--output_dir", str(tmp_path / "out")], types)


def test_yaml_scalars_reach_text_fields_as_written(tmp_path):
    *_, args = _parse(
        tmp_path,
        "save_strategy: no\nrun_name: -exp-12:30\nlr_scheduler_type: linear\nhub_model_id: 010\n"
        "eval_on_start: yes\ntorch_compile: off\nlearning_rate: 1e-3\nmax_grad_norm: .inf\nmax_steps: 0x10\n"
        "weight_decay: -0.0\nadam_epsilon: -1.0e-5\nreport_to: null\n",
    )
    assert args.save_strategy == "no" and args.run_name == "-exp-12:30" and args.hub_model_id == "010"
    assert args.eval_on_start is True and args.torch_compile is False
    assert args.learning_rate == 1e-3 and args.max_grad_norm == math.inf and args.max_steps == 16
    assert args.adam_epsilon == -1e-5


@pytest.mark.parametrize("value, expected", [("no", "no"), ("12:30", "12:30"), ("1.10", "1.10"), ("-x", "-x"), ("'no'", "no"), ("off", "off")])
def test_yaml_plain_scalar_in_a_string_field_keeps_its_text(tmp_path, value, expected):
    *_, args = _parse(tmp_path, f"run_name: {value}\n")
    assert args.run_name == expected


def test_yaml_list_items_may_start_with_a_dash_and_the_command_line_still_wins(tmp_path):
    model_args, data_args, lora_args, diagnostics, args = _parse(tmp_path, "lora_target_modules: [-odd, q_proj, 12:30]\n", finetune=True)
    assert lora_args.lora_target_modules == ["-odd", "q_proj", "12:30"]


@pytest.mark.parametrize(
    "text, match",
    [
        ("max_steps: 3\nlearning_rate: 1.0e-3\nmax_steps: 5\n", r"key 'max_steps' is given twice \(lines 1 and 3\)"),
        ("max_steps: yes\n", r"--max_steps.*invalid int value: 'yes'"),
        ("max_steps: 1.5\n", r"--max_steps.*invalid int value: '1.5'"),
        ("save_strategy: maybe\n", r"--save_strategy.*'maybe'"),
        (b"run_name: caf\xe9\n", r"config file .*config.yaml is not UTF-8"),
        ("lora_target_modules: [q_proj, null]\n", r"lora_target_modules.*not a single value"),
    ],
)
def test_bad_yaml_values_are_named(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        _parse(tmp_path, text, finetune="lora" in str(text))


def test_config_that_is_a_directory_is_named(tmp_path):
    from sai_hf.recipes.config import load_yaml_config

    with pytest.raises(ValueError, match=r"is a directory"):
        load_yaml_config(tmp_path)


# --------------------------------------------------------------------------- recipe data

pretrain_gpt2 = _load_script("pretrain_gpt2")


#: Keeps a run tiny should a check ever let bad input through (the flags under test come after).
TINY = ["--report_to", "none", "--max_steps", "1", "--eval_strategy", "no", "--save_strategy", "no", "--disable_tqdm", "true",
        "--tokenizer_vocab_size", "300", "--corpus_max_files", "3", "--block_size", "32"]  # fmt: skip


def _pretrain_with(tmp_path: Path, *extra: str):
    return pretrain_gpt2.main([str(CONFIGS / "gpt2-local.yaml"), "--output_dir", str(tmp_path / "out"),
                               "--recipe_cache_dir", str(tmp_path / "cache"), *TINY,
                               "--n_layer", "1", "--n_embd", "32", "--n_head", "2", *extra])  # fmt: skip


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("empty.txt", "", r"train file .*empty.txt is empty"),
        ("blank.txt", "\n  \n\t\n", r"train file .*blank.txt holds only whitespace"),
        ("header.csv", "text\n", r"train file .*header.csv holds no rows"),
        ("none.json", "[]", r"train file .*none.json holds no rows"),
        ("broken.json", "{oops", r"cannot read train file .*broken.json as json data"),
        ("numbers.csv", "text,id\n1,2\n3,4\n5,6\n", r"column 'text' .* of dataset .*numbers.csv holds int64 values"),
        ("lists.jsonl", '{"text": ["a", "b"]}\n' * 4, r"column 'text' .* of dataset .*lists.jsonl holds List"),
        ("one.txt", "a single line of text\n", r"only 1 row.*validation_split_percentage=5.0 leaves none"),
    ],
)
def test_bad_train_files_are_named_before_training(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        _pretrain_with(tmp_path, "--train_file", str(path))
    assert not (tmp_path / "out" / "trainer_state.json").exists()


def test_empty_validation_file_is_named(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("some text\n" * 20)
    valid = tmp_path / "valid.txt"
    valid.write_text("")
    with pytest.raises(ValueError, match=r"validation file .*valid.txt is empty"):
        _pretrain_with(tmp_path, "--train_file", str(train), "--validation_file", str(valid))


def test_train_file_that_is_a_directory_is_named(tmp_path):
    folder = tmp_path / "data.txt"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"train file .*data.txt is not a regular file"):
        _pretrain_with(tmp_path, "--train_file", str(folder))


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--max_train_samples", "0"),
        ("--max_eval_samples", "-3"),
        ("--block_size", "1"),
        ("--validation_split_percentage", "100"),
        ("--corpus_max_files", "0"),
        ("--preprocessing_num_workers", "0"),
        ("--text_column", " "),
        ("--n_layer", "0"),
        ("--model_dropout", "1.5"),
    ],
)
def test_recipe_numbers_that_leave_nothing_to_train_on_are_named(tmp_path, flag, value):
    with pytest.raises(ValueError, match=rf"Invalid {flag[2:]}="):
        _pretrain_with(tmp_path, flag, value)


@pytest.mark.parametrize("flag, value", [("--lora_r", "0"), ("--lora_dropout", "1.0"), ("--num_key_value_heads", "0")])
def test_lora_recipe_numbers_are_named(tmp_path, flag, value):
    finetune = _load_script("finetune_llama_lora")
    with pytest.raises(ValueError, match=rf"Invalid {flag[2:]}="):
        finetune.main(
            [str(CONFIGS / "llama-lora-local.yaml"), "--output_dir", str(tmp_path), "--recipe_cache_dir", str(tmp_path / "cache"),
             *TINY, "--base_pretrain_steps", "0", "--hidden_size", "32", "--intermediate_size", "32", "--num_hidden_layers", "1",
             "--num_attention_heads", "2", "--num_key_value_heads", "1", flag, value]
        )  # fmt: skip


@pytest.mark.parametrize(
    "records, match",
    [
        ([{"prompt": "p", "completion": None}] * 4 + [{"prompt": "p", "completion": "c"}] * 4, r"column 'completion' .*missing \(null\)"),
        ([{"prompt": i, "completion": "c"} for i in range(8)], r"column 'prompt' .*holds int64 values"),
    ],
)
def test_prompt_completion_columns_must_hold_text(tmp_path, records, match):
    from sai_hf.recipes.arguments import FinetuneDataArguments
    from sai_hf.recipes.finetuning_data import finetuning_examples

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    data_args = FinetuneDataArguments(train_file=str(path), validation_split_percentage=25)
    with pytest.raises(ValueError, match=match):
        finetuning_examples(data_args, tokenizer=None)


def test_cache_variable_that_is_not_a_directory_is_named(tmp_path, monkeypatch):
    from sai_hf.recipes.cache import resolve_cache_dir

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    monkeypatch.setenv("SAI_HF_CACHE", str(not_a_dir))
    with pytest.raises(ValueError, match=r"environment variable SAI_HF_CACHE=.*is not a directory"):
        resolve_cache_dir()


def test_recipe_command_line_error_is_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    completed = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "pretrain_gpt2.py"), str(CONFIGS / "gpt2-local.yaml"),
         "--output_dir", str(tmp_path), "--max_train_samples", "0"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert "Traceback" not in completed.stderr
    lines = [line for line in completed.stderr.splitlines() if "error:" in line]
    assert lines == [
        "pretrain_gpt2.py: error: Invalid max_train_samples=0: expected a number of examples >= 1 (leave it unset to "
        "keep them all)"
    ]


# --------------------------------------------------------------------------- python -m sai_hf.run


def _run_main(argv):
    from sai_hf.run import main

    return main(argv)


def test_run_a_directory_with_main_as_python_does(tmp_path, capsys):
    app = tmp_path / "app"
    app.mkdir()
    (app / "helper.py").write_text("VALUE = 7\n")
    report = tmp_path / "seen.json"
    (app / "__main__.py").write_text(
        textwrap.dedent(
            f"""
            import json, sys
            import helper  # importable: the directory is sys.path[0]
            json.dump({{"name": __name__, "argv": sys.argv[1:], "path0": sys.path[0], "value": helper.VALUE,
                        "optim": "sgd_sai" in [m.value for m in __import__("transformers").training_args.OptimizerNames]}},
                      open({str(report)!r}, "w"))
            sys.exit(5)
            """
        )
    )
    with pytest.raises(SystemExit) as exit_info:
        _run_main([str(app), "--flag", "x"])
    assert exit_info.value.code == 5
    seen = json.loads(report.read_text())
    assert seen == {"name": "__main__", "argv": ["--flag", "x"], "path0": str(app), "value": 7, "optim": True}


@pytest.mark.parametrize(
    "argv, match",
    [
        ([], r"error: no script given"),
        (["-m"], r"error: -m needs a module name"),
        (["-m", "surely_missing_module_xyz"], r"error: no module named 'surely_missing_module_xyz'"),
        (["-m", "surely_missing_pkg_xyz.train"], r"error: error while finding module specification for 'surely_missing_pkg_xyz.train'"),
        (["-m", "json"], r"error: no module named 'json.__main__'; 'json' is a package"),
        (["-m", ".relative"], r"error: relative module names are not supported"),
        (["--optim", "sgd_sai"], r"error: unknown option '--optim'"),
        (["missing_script.py"], r"error: can't open file 'missing_script.py': no such file"),
    ],
)
def test_run_launcher_errors_are_one_line_and_exit_2(argv, match, capsys):
    assert _run_main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("python -m sai_hf.run: error: ")
    assert re.search(match, err), err


def test_run_directory_without_main_is_one_line(tmp_path, capsys):
    assert _run_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "can't find '__main__' module in" in err


def test_run_missing_module_from_the_shell_has_no_traceback():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    completed = subprocess.run(
        [sys.executable, "-m", "sai_hf.run", "-m", "surely_missing_module_xyz"], capture_output=True, text=True, env=env, timeout=300
    )
    assert completed.returncode == 2
    assert completed.stderr.strip() == "python -m sai_hf.run: error: no module named 'surely_missing_module_xyz'"


def test_run_help_says_what_the_launcher_does(capsys):
    assert _run_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.count("usage:") == 1
    assert "--optim sgd_sai" in out and "Trainer" in out and "-m MODULE" in out


# =========================================================================== 7. a newcomer's first minutes


def test_pyproject_license_is_an_spdx_string_with_a_setuptools_that_reads_it():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"
    requires = pyproject["build-system"]["requires"]
    setuptools_req = next(r for r in requires if r.startswith("setuptools"))
    assert int(re.search(r">=\s*(\d+)", setuptools_req).group(1)) >= 77


def test_readme_lists_every_optim_args_key():
    from sai_hf.integration import REGISTRY

    readme = (REPO / "README.md").read_text()
    paragraph = readme[readme.index("`--optim_args` keys:") :].split("\n\n")[0]
    for key in REGISTRY["sgd_sai"].options:
        assert f"`{key}`" in paragraph, key


def _fake_venv(tmp_path: Path, fail_step: str | None) -> Path:
    """A venv whose python answers setup.sh's calls: noise on every pip call, a failure on one."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(
        textwrap.dedent(
            f"""\
            #!/usr/bin/env bash
            case "$*" in
              *"import torch, transformers"*) echo "sai-hf fake"; exit 0 ;;
              *"import torch"*) exit 0 ;;
            esac
            echo "NOISE: BuildBackendWarning: Editable installation. Please be careful with folders"
            case "$*" in
              *"{fail_step or "never-fails"}"*) echo "ERROR: pip failed on purpose" >&2; exit 7 ;;
            esac
            exit 0
            """
        )
    )
    python.chmod(0o755)
    return venv


def test_setup_script_is_quiet_when_pip_succeeds_and_loud_when_it_fails(tmp_path):
    venv = _fake_venv(tmp_path, fail_step=None)
    env = {**os.environ, "VENV": str(venv)}
    ok = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh")], capture_output=True, text=True, env=env, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "NOISE" not in ok.stdout + ok.stderr and "NOISE" in (venv / "pip-install.log").read_text()
    assert (venv / ".sai_hf_installed").exists()

    venv = _fake_venv(tmp_path / "failing", fail_step=" -e ")
    env = {**os.environ, "VENV": str(venv)}
    failed = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh")], capture_output=True, text=True, env=env, timeout=60)
    assert failed.returncode == 7
    assert "ERROR: pip failed on purpose" in failed.stderr and "setup: error:" in failed.stderr
    assert not (venv / ".sai_hf_installed").exists()
