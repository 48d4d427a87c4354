"""Hostile round 3 (issue 20): the paths around the optimizer: checkpoint import, the comparison
script, the recipe cache, the C build, the launcher, drift and plotting."""

from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch

import sai_hf  # noqa: F401  (registers --optim sgd_sai)
from _models import TokenDataset, tiny_gpt2, training_args


# --------------------------------------------------------------------------- 1. official checkpoint with a scheduler
def _official_trainer(tmp_path, max_steps):
    """A Trainer run of the official SGD_sai built over model.parameters() (one group), cosine schedule."""
    sgd_sai = pytest.importorskip("sgd_sai")
    from transformers import Trainer

    model = tiny_gpt2()
    optimizer = sgd_sai.SGD_sai(model.parameters(), lr=3e-3, momentum=0.9, weight_decay=0.1)
    args = training_args(
        tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=2, lr_scheduler_type="cosine", weight_decay=0.01
    )
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(), optimizers=(optimizer, None))
    with contextlib.redirect_stdout(io.StringIO()):  # the official package prints its warm-up banner
        trainer.train()
    return trainer


def test_trainer_checkpoint_of_official_sgd_sai_resumes_with_optim_sgd_sai(tmp_path):
    from transformers import Trainer

    official = _official_trainer(tmp_path / "official", max_steps=4)
    checkpoint = tmp_path / "official" / "checkpoint-2"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=False)
    assert "initial_lr" in saved["param_groups"][0] and len(saved["param_groups"]) == 1  # what a Trainer writes

    args = training_args(tmp_path / "resumed", max_steps=4, lr_scheduler_type="cosine", weight_decay=0.01)
    resumed = Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset())
    with pytest.warns(UserWarning, match="official sgd-sai"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    groups = resumed.optimizer.param_groups
    assert len(groups) == 2  # the Trainer's decay / no-decay groups, each with the official hyperparameters
    assert all(g["weight_decay"] == 0.1 and g["initial_lr"] == 3e-3 and g["normalize"] == "none" for g in groups)
    assert groups[0]["lr"] == groups[1]["lr"]  # the schedule runs on both groups
    logged = [h["learning_rate"] for h in resumed.state.log_history if "learning_rate" in h]
    official_logged = [h["learning_rate"] for h in official.state.log_history if "learning_rate" in h]
    assert logged == official_logged  # (the resumed history starts with the checkpoint's)
    # the resumed run continues the official one: same weights after step 4
    for (name, a), b in zip(resumed.model.named_parameters(), official.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("named", [False, True])
@pytest.mark.parametrize("scheduler", ["lambda", "onecycle", "cyclic"])
def test_official_state_with_scheduler_keys_is_imported(named, scheduler):
    sgd_sai = pytest.importorskip("sgd_sai")
    from sai_hf import SGDSaI

    model = tiny_gpt2()
    optimizer = sgd_sai.SGD_sai(model.named_parameters() if named else model.parameters(), lr=1e-3, weight_decay=0.1)
    make = {
        "lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda step: 0.5),
        "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=10),
        "cyclic": lambda o: torch.optim.lr_scheduler.CyclicLR(o, 1e-4, 1e-2),
    }
    schedule = make[scheduler](optimizer)
    ids = torch.randint(0, 128, (2, 8))
    with contextlib.redirect_stdout(io.StringIO()):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        schedule.step()
    saved = optimizer.state_dict()
    fresh = tiny_gpt2()
    mine = SGDSaI(fresh.parameters(), lr=5.0)
    with pytest.warns(UserWarning, match="official sgd-sai"):
        mine.load_state_dict(saved)
    assert mine.param_groups[0]["lr"] == saved["param_groups"][0]["lr"]
    assert mine.param_groups[0]["initial_lr"] == saved["param_groups"][0]["initial_lr"]
    for p, q in zip(fresh.parameters(), model.parameters()):
        torch.testing.assert_close(mine.state[p]["momentum_buffer"], optimizer.state[q]["momentum_buffer"])
        assert mine.state[p]["scale"] == pytest.approx(float(optimizer.state[q]["gsnr"]))


def test_official_state_onto_other_groups_without_model_order_says_what_to_do():
    sgd_sai = pytest.importorskip("sgd_sai")
    from sai_hf import SGDSaI

    params = [torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    official = sgd_sai.SGD_sai(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    with contextlib.redirect_stdout(io.StringIO()):
        official.step()
    mine = SGDSaI([{"params": [torch.randn(3, requires_grad=True)]}, {"params": [torch.randn(4, 3, requires_grad=True)]}], lr=1e-3)
    with pytest.raises(ValueError, match="remember_parameter_order"):
        mine.load_state_dict(official.state_dict())


# --------------------------------------------------------------------------- 2-4. compare_optimizers.py
def _compare():
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "compare_optimizers.py"
    spec = importlib.util.spec_from_file_location("compare_optimizers", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--optimizers", "sgd_sai,sgd_sai"], "sgd_sai is given twice"),
        (["--optimizers", "sgd_sai", "--grid", "sgd_sai=3e-3,3e-3"], "3e-3,3e-3.*0.003 is given twice"),
        (["--optimizers", "sgd_sai", "--grid", "sgd_sai=3e-3,0.003"], "0.003 is given twice"),
        (["--optimizers", "sgd_sai", "--grid", "sgd_sai=0.0030000001,0.003"], "0.003 is given twice"),  # one run dir
        (["--optimizers", "sgd_sai", "--grid", "sgd_sai=1e-3", "--grid", "sgd_sai=3e-3"], "sgd_sai is given twice"),
        (["--optimizers", "sgd_sai", "--grid", "sgd_sai="], "no learning rate"),
        (["--optimizers", "sgd_sai", "--grid", "sgd_sai=nan"], "nan"),
        (["--optimizers", ","], "no optimizer"),
        (["--optimizers", "../../x"], "'../../x' is not an optimizer name"),
    ],
)
def test_compare_refuses_repeated_points(tmp_path, argv, match, monkeypatch):
    compare = _compare()
    monkeypatch.setattr(compare, "run_one", lambda *a: pytest.fail("a run started"))
    with pytest.raises(ValueError, match=match):
        compare.main([*argv, "--out_dir", str(tmp_path)])


@pytest.mark.parametrize(
    "flag, instead",
    [
        (["--learning_rate", "1"], "--grid"),
        (["--learning_rate=1"], "--grid"),
        (["--optim", "adamw_torch"], "--optimizers"),
        (["--optim_args", "momentum=0.5"], "optim_args"),
        (["--seed", "7"], "--seeds"),  # not read as an abbreviation of --seeds
        (["--output_dir", "x"], "--out_dir"),
    ],
)
def test_compare_refuses_pass_through_flags_the_sweep_sets(tmp_path, flag, instead, monkeypatch):
    compare = _compare()
    monkeypatch.setattr(compare, "run_one", lambda *a: pytest.fail("a run started"))
    with pytest.raises(ValueError, match=f"{flag[0].split('=')[0]} is set by the sweep.*{instead}"):
        compare.main(["--optimizers", "sgd_sai", *flag, "--out_dir", str(tmp_path)])


def test_compare_resume_is_keyed_on_the_config_contents(tmp_path, monkeypatch, capsys):
    """A finished run is reused only while the config file (and code, environment) are unchanged."""
    import json
    import subprocess
    from pathlib import Path

    compare = _compare()
    config = tmp_path / "config.yaml"
    config.write_text("max_steps: 3\nblock_size: 16\n")
    calls = []

    def fake_child(command, stdout=None, stderr=None, env=None):
        spec = json.loads(command[-1])
        calls.append(spec["argv"])
        Path(spec["result"]).write_text(json.dumps({"argv": spec["argv"], "optim": spec["optim"]}))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(compare.subprocess, "run", fake_child)
    sweep = compare.Sweep(str(config), "gpt2", tmp_path / "out", [], 16, resume=True)
    compare.run_one(sweep, "sgd", 0.1, 1)
    compare.run_one(sweep, "sgd", 0.1, 1)
    assert len(calls) == 1  # reused: nothing changed
    config.write_text("max_steps: 300\nblock_size: 16\n")  # same path, same argv: other contents
    compare.run_one(sweep, "sgd", 0.1, 1)
    assert len(calls) == 2 and "config_sha256" in capsys.readouterr().out
    monkeypatch.setenv("SAI_HF_CPU_KERNEL", "0")
    compare.run_one(sweep, "sgd", 0.1, 1)
    assert len(calls) == 3 and "environment" in capsys.readouterr().out
    # a truncated result file is rerun, not a crash
    (tmp_path / "out" / "runs" / "sgd-lr0.1-seed1" / "result.json").write_text('{"argv": [')
    compare.run_one(sweep, "sgd", 0.1, 1)
    assert len(calls) == 4


def test_compare_reads_block_size_given_as_flag_equals_value():
    compare = _compare()
    assert compare._last_override(["--block_size=64", "--max_steps", "5"], "--block_size", 128) == "64"
    assert compare._last_override(["--max_steps", "5"], "--block_size", 128) == 128


# --------------------------------------------------------------------------- 5. the LoRA recipe's cached base
def _base_key_and_args(tmp_path, **run_fields):
    from datasets import Dataset, DatasetDict
    from transformers import TrainingArguments

    from sai_hf.recipes.arguments import DataArguments, LlamaModelArguments
    from sai_hf.recipes.pretrained_base import base_cache_key, base_training_arguments

    class Tokenizer:
        def get_vocab(self):
            return {f"t{i}": i for i in range(64)}

        def __len__(self):
            return 64

    corpus = DatasetDict(train=Dataset.from_dict({"text": ["a = 1\n"], "path": ["a.py"]}))
    model_args = LlamaModelArguments(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    data_args = DataArguments(block_size=32)
    run = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **run_fields)
    key = base_cache_key(model_args, data_args, run, Tokenizer(), corpus)
    return key, base_training_arguments(run, tmp_path / "base", model_args)


@pytest.mark.parametrize(
    "field, value",
    [("max_grad_norm", 0.25), ("adam_beta1", 0.5), ("adam_beta2", 0.9), ("adam_epsilon", 1e-3),
     ("label_smoothing_factor", 0.2), ("neftune_noise_alpha", 5.0), ("dataloader_drop_last", True),
     ("train_sampling_strategy", "sequential")],
)  # fmt: skip
def test_cached_base_does_not_depend_on_the_run_that_created_it(tmp_path, field, value):
    """A field the cache key leaves out must not reach the base's pretraining."""
    key, base = _base_key_and_args(tmp_path)
    other_key, other_base = _base_key_and_args(tmp_path, **{field: value})
    assert other_key == key
    assert getattr(other_base, field) == getattr(base, field) != value


@pytest.mark.parametrize(
    "fields",
    [dict(lr_scheduler_type="cosine_with_restarts", lr_scheduler_kwargs={"num_cycles": 3}), dict(warmup_steps=7),
     dict(per_device_train_batch_size=3), dict(gradient_accumulation_steps=2)],
)  # fmt: skip
def test_run_settings_the_base_uses_are_in_its_cache_key(tmp_path, fields):
    key, _ = _base_key_and_args(tmp_path, lr_scheduler_type="cosine_with_restarts")
    other_key, base = _base_key_and_args(tmp_path, **{"lr_scheduler_type": "cosine_with_restarts", **fields})
    assert other_key != key
    assert all(getattr(base, name) == value for name, value in fields.items())


# --------------------------------------------------------------------------- 6. the C build
@pytest.fixture
def fresh_native():
    """``sai_hf.native`` with its per-process library forgotten before and after the test."""
    from sai_hf import native

    native.library.cache_clear()
    yield native
    native.library.cache_clear()


def test_cc_with_an_unbalanced_quote_warns_and_the_optimizer_still_builds(fresh_native, monkeypatch):
    from sai_hf import SGDSaI

    monkeypatch.setenv("CC", "gcc -DNAME='x")
    with pytest.warns(RuntimeWarning, match=r"CC=.*cannot be split.*No closing quotation.*torch-ops"):
        opt = SGDSaI([torch.nn.Parameter(torch.ones(4))], lr=1e-3)
    assert not fresh_native.available()
    opt.param_groups[0]["params"][0].grad = torch.randn(4)
    opt.step()  # on the torch-ops path


def test_failed_compile_quotes_the_first_error_line(fresh_native, monkeypatch, tmp_path):
    import shutil

    gcc = shutil.which("gcc") or pytest.skip("no gcc")
    fake = tmp_path / "fakecc"
    fake.write_text(
        "#!/bin/sh\n"
        'case "$*" in *" -o "*) echo "sgd_sai_cpu.c:3:1: error: the first problem" >&2; '
        'echo "sgd_sai_cpu.c:9:1: note: detail" >&2; echo "compilation terminated." >&2; exit 1;; esac\n'
        f'exec {gcc} "$@"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with pytest.warns(RuntimeWarning) as caught:
        fresh_native.library()
    (message,) = [str(w.message) for w in caught if "native CPU kernels" in str(w.message)]
    assert "error: the first problem" in message and "compilation terminated." in message


def test_unloadable_build_names_the_build_directory_setting(fresh_native, monkeypatch, tmp_path):
    """A noexec TMPDIR: the library builds but cannot be mapped; the warning names SAI_HF_BUILD_DIR,
    which moves the build."""
    import ctypes

    real = ctypes.CDLL

    def noexec(path, *args, **kwargs):
        raise OSError(f"{path}: failed to map segment from shared object")

    monkeypatch.setattr(fresh_native.ctypes, "CDLL", noexec)
    with pytest.warns(RuntimeWarning, match="failed to map segment.*set SAI_HF_BUILD_DIR"):
        fresh_native.library()
    fresh_native.library.cache_clear()
    loaded_from = []
    monkeypatch.setattr(fresh_native.ctypes, "CDLL", lambda path, *a, **k: loaded_from.append(path) or real(path, *a, **k))
    monkeypatch.setenv("SAI_HF_BUILD_DIR", str(tmp_path))
    assert fresh_native.library().failure is None
    assert loaded_from and loaded_from[0].startswith(str(tmp_path))
    fresh_native.library.cache_clear()
    monkeypatch.setenv("SAI_HF_BUILD_DIR", str(tmp_path / "missing"))
    with pytest.warns(RuntimeWarning, match="SAI_HF_BUILD_DIR=.*missing.*not an existing directory"):
        fresh_native.library()


def test_threads_constructing_at_once_build_once(fresh_native, monkeypatch):
    import threading
    import time

    builds = []

    def slow_build(self):
        builds.append(threading.get_ident())
        time.sleep(0.2)

    monkeypatch.setattr(fresh_native.NativeLibrary, "build", slow_build)
    barrier = threading.Barrier(4)
    results = []

    def construct():
        barrier.wait()
        results.append(fresh_native.library())

    threads = [threading.Thread(target=construct) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len({id(r) for r in results}) == 1


@pytest.mark.parametrize("value", ["0", "false", "FALSE", "off", "no", " 0", "0 "])
def test_cpu_kernel_variable_is_read_like_a_boolean(fresh_native, monkeypatch, value):
    monkeypatch.setattr(fresh_native.NativeLibrary, "build", lambda self: pytest.fail("built although disabled"))
    monkeypatch.setenv("SAI_HF_CPU_KERNEL", value)
    assert not fresh_native.available() and fresh_native.library().failure.startswith("disabled by SAI_HF_CPU_KERNEL")


@pytest.mark.parametrize("value", ["maybe", "2", "disable"])
def test_cpu_kernel_variable_of_unknown_value_is_an_error_naming_it(fresh_native, monkeypatch, value):
    monkeypatch.setenv("SAI_HF_CPU_KERNEL", value)
    with pytest.raises(ValueError, match=f"SAI_HF_CPU_KERNEL={value!r}"):
        fresh_native.library()


# --------------------------------------------------------------------------- the launcher
def test_launcher_keeps_the_scripts_path_until_its_threads_end(tmp_path):
    import threading

    from sai_hf import run

    script_dir = tmp_path / "scriptdir"
    script_dir.mkdir()
    (script_dir / "helper_module_r3.py").write_text("VALUE = 7\n")
    out = tmp_path / "seen.txt"
    script = script_dir / "train.py"
    script.write_text(
        "import sys, threading, time\n"
        "def late():\n"
        "    time.sleep(0.3)\n"
        "    import helper_module_r3\n"  # found through sys.path[0], the script's directory
        f"    open({str(out)!r}, 'w').write(sys.path[0] + '|' + sys.argv[1] + '|' + str(helper_module_r3.VALUE))\n"
        "threading.Thread(target=late).start()\n"
    )
    before = set(threading.enumerate())
    try:
        assert run.main([str(script), "--flag"]) == 0
    finally:
        for t in set(threading.enumerate()) - before:
            t.join()
    assert out.read_text() == f"{script_dir}|--flag|7"


# --------------------------------------------------------------------------- training_args.bin
def test_training_args_bin_unpickles_without_sai_hf(tmp_path):
    import subprocess
    import sys

    from transformers import TrainingArguments
    from transformers.training_args import OptimizerNames

    path = tmp_path / "training_args.bin"
    torch.save(TrainingArguments(output_dir=str(tmp_path), optim="sgd_sai", report_to="none"), path)
    code = (
        "import sys, torch\n"
        f"args = torch.load({str(path)!r}, weights_only=False)\n"
        "assert 'sai_hf' not in sys.modules\n"
        "print(type(args.optim).__name__, args.optim)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["str", "sgd_sai"]
    loaded = torch.load(path, weights_only=False)  # with sai_hf imported: the enum member
    assert loaded.optim is OptimizerNames("sgd_sai")


# --------------------------------------------------------------------------- recipe config: merge keys
@pytest.mark.parametrize(
    "text",
    [
        "<<: {save_strategy: no, run_name: 1.10}\nlogging_steps: 3\n",
        "<<: [{save_strategy: no}, {run_name: 1.10}]\n",
        "<<: {save_strategy: steps, run_name: 1.10}\nsave_strategy: no\n",
    ],
)
def test_merge_keys_keep_values_as_written(tmp_path, text):
    from transformers import TrainingArguments

    from sai_hf.recipes.config import parse_recipe_args

    config = tmp_path / "config.yaml"
    config.write_text(f"output_dir: {tmp_path}\nreport_to: none\nuse_cpu: true\n" + text)
    (args,) = parse_recipe_args([str(config)], (TrainingArguments,))
    assert str(args.save_strategy.value if hasattr(args.save_strategy, "value") else args.save_strategy) == "no"
    assert args.run_name == "1.10"  # not YAML's float 1.1


# --------------------------------------------------------------------------- plot_gsnr.py, drift
def _plot_gsnr():
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "plot_gsnr.py"
    spec = importlib.util.spec_from_file_location("plot_gsnr", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("gsnr.json", '{"h.0.attn.weight": {"gsnr": 3.0, "sc', "cannot read .*gsnr.json"),
        ("gsnr.json", "[1, 2]", "gsnr.json is not a g-SNR report"),
        ("gsnr.json", '{"h.0.attn.weight": {"scale": 1.0}}', "block 'h.0.attn.weight' has no 'gsnr'"),
        ("gsnr_history.json", '{"steps": [1, 2], "blo', "cannot read .*gsnr_history.json"),
    ],
)
def test_plot_gsnr_names_a_broken_file(tmp_path, capsys, name, text, match):
    (tmp_path / "gsnr.json").write_text('{"h.0.attn.weight": {"gsnr": 3.0, "scale": 3.0}}')
    (tmp_path / name).write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        _plot_gsnr().main([str(tmp_path)])
    assert exit_info.value.code == 2
    import re

    assert re.search(match, capsys.readouterr().err)


def test_spearman_of_all_tied_values_is_undefined_not_perfect():
    import math

    from sai_hf.drift import drift_summary, spearman

    assert math.isnan(spearman([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]))
    assert math.isnan(spearman([5.0, 5.0], [1.0, 2.0]))
    assert math.isnan(drift_summary([1.0, 2.0, 3.0], [4.0, 4.0, 4.0])["spearman"])
    assert spearman([1.0, 2.0, 3.0], [1.0, 2.0, 4.0]) == pytest.approx(1.0)


# --------------------------------------------------------------------------- the base cache: concurrent runs
def test_building_a_base_leaves_another_runs_staging_alone(tmp_path):
    """Two runs building the same base at once: neither deletes (nor writes into) the other's staging."""
    from datasets import Dataset, DatasetDict
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, TrainingArguments

    from sai_hf.recipes.arguments import DataArguments, LlamaModelArguments
    from sai_hf.recipes.pretrained_base import base_cache_key, pretrained_local_llama

    texts = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(200)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", unk_token="<unk>")
    corpus = DatasetDict(train=Dataset.from_dict({"text": texts}))
    model_args = LlamaModelArguments(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        base_pretrain_steps=2, recipe_cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    data_args = DataArguments(block_size=16)
    run = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none", per_device_train_batch_size=2)
    key = base_cache_key(model_args, data_args, run, tokenizer, corpus)
    bases = tmp_path / "cache" / "bases"
    bases.mkdir(parents=True)
    others = [bases / f".llama-{key}.staging", bases / f".llama-{key}.staging-0123456789ab"]
    for other in others:  # another run, mid-way: the old shared name, and a launch token
        other.mkdir()
        (other / "partial.bin").write_bytes(b"not ours")
    model = pretrained_local_llama(model_args, data_args, run, tokenizer, corpus)
    assert model.config.hidden_size == 16
    entry = bases / f"llama-{key}"
    assert (entry / "config.json").is_file() and not (entry / "partial.bin").exists()
    for other in others:
        assert (other / "partial.bin").read_bytes() == b"not ours"
    # nothing of ours is left behind
    assert sorted(p.name for p in bases.iterdir()) == sorted([entry.name, *(o.name for o in others)])
