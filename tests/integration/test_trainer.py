"""`--optim sgd_sai` in transformers: registration, Trainer, --optim_args, GSNRCallback."""

from __future__ import annotations

import importlib
import json
import logging
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from _models import TokenDataset, tiny_gpt2, tiny_llama, training_args
from transformers import HfArgumentParser, Seq2SeqTrainingArguments, Trainer, TrainingArguments
from transformers.trainer import DEFAULT_CALLBACKS
from transformers.trainer_callback import TrainerCallback
from transformers.training_args import OptimizerNames
from transformers.utils import logging as transformers_logging

import sai_hf
from sai_hf import GSNRCallback, SGDSaI, find_sgd_sai
from sai_hf.callback import AutoGSNRCallback
from sai_hf.drift import TRACK_EVERY_ENV

# --------------------------------------------------------------------------- registration


def test_import_twice_registers_once():
    before = (list(OptimizerNames), list(DEFAULT_CALLBACKS))
    importlib.reload(sai_hf)
    sai_hf.register()
    assert list(OptimizerNames) == before[0]
    assert [m.value for m in OptimizerNames].count("sgd_sai") == 1
    assert DEFAULT_CALLBACKS.count(AutoGSNRCallback) == 1
    assert GSNRCallback not in DEFAULT_CALLBACKS  # only the automatic subclass, which yields to hand-added ones
    assert OptimizerNames("sgd_sai") is OptimizerNames.SGD_SAI


@pytest.mark.parametrize("args_cls", [TrainingArguments, Seq2SeqTrainingArguments])
def test_hf_argument_parser_accepts_optim_sgd_sai(tmp_path, args_cls):
    (args,) = HfArgumentParser(args_cls).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "sgd_sai", "--optim_args", "momentum=0.8", "--use_cpu", "true"]
    )
    assert args.optim == OptimizerNames.SGD_SAI
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert cls is SGDSaI and kwargs["momentum"] == 0.8


def test_parser_still_rejects_unknown_optimizer(tmp_path, capsys):
    with pytest.raises(SystemExit):
        HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--optim", "sgd_saii"])
    assert "invalid choice" in capsys.readouterr().err


def test_trl_sft_config_accepts_sgd_sai(tmp_path):
    trl = pytest.importorskip("trl")
    config = trl.SFTConfig(output_dir=str(tmp_path), optim="sgd_sai", use_cpu=True, bf16=False, report_to="none")
    assert config.optim == OptimizerNames.SGD_SAI


# --------------------------------------------------------------------------- Trainer builds SGDSaI


def test_optim_args_reach_every_constructor_option(tmp_path):
    args = training_args(tmp_path, optim_args="momentum_dtype=bf16,foreach=true,maximize=false")
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert kwargs["momentum_dtype"] is torch.bfloat16 and kwargs["foreach"] is True and kwargs["maximize"] is False
    optimizer = cls([torch.zeros(2, requires_grad=True)], **kwargs)
    assert optimizer.param_groups[0]["momentum_dtype"] is torch.bfloat16


def test_optim_args_scale_rule_sqrt_numel(tmp_path):
    """``--optim_args scale_rule=sqrt_numel`` (the authors' later variant) reaches the optimizer and
    scales by sqrt(numel); a typo names the key's accepted values before training."""
    args = training_args(tmp_path, optim_args="scale_rule=sqrt_numel")
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert kwargs["scale_rule"] == "sqrt_numel"
    with pytest.raises(ValueError, match="scale_rule"):
        Trainer.get_optimizer_cls_and_kwargs(training_args(tmp_path, optim_args="scale_rule=sqrt"))
    trainer = _train(tmp_path, optim_args="scale_rule=sqrt_numel")
    report = json.loads((tmp_path / "gsnr.json").read_text())
    assert report and all(e["scale"] == pytest.approx(math.sqrt(e["numel"]), rel=1e-12) for e in report.values())
    assert all(e["gsnr"] > 0 and e["gsnr"] != e["scale"] for e in report.values() if e["numel"] > 1)
    assert find_sgd_sai(trainer.optimizer).param_groups[0]["scale_rule"] == "sqrt_numel"


def test_trainer_builds_sgd_sai_with_hf_weight_decay_groups(tmp_path):
    model = tiny_gpt2()
    args = training_args(tmp_path, learning_rate=3e-4, weight_decay=0.1, optim_args="momentum=0.8, normalize=max, eps=1e-6")
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset())
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, SGDSaI)
    decay = set(trainer.get_decay_parameter_names(model))
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        assert group["lr"] == 3e-4 and group["momentum"] == 0.8 and group["eps"] == 1e-6
        assert group["normalize"] == "max"
        for p in group["params"]:
            assert group["weight_decay"] == (0.1 if names[id(p)] in decay else 0.0), names[id(p)]
    assert any(g["weight_decay"] == 0.0 and g["params"] for g in optimizer.param_groups)
    assert any(isinstance(cb, GSNRCallback) for cb in trainer.callback_handler.callbacks)


@pytest.mark.parametrize(
    "overrides, key, source",
    [
        (dict(optim_args="momentun=0.9"), "momentun", "--optim_args"),
        (dict(optim_args="momentum=abc"), "momentum", "--optim_args"),
        (dict(optim_args="momentum=1.5"), "momentum", "--optim_args"),
        (dict(optim_args="momentum=2"), "momentum", "--optim_args"),
        (dict(optim_args="momentum=-0.1"), "momentum", "--optim_args"),
        (dict(optim_args="eps=-1e-8"), "eps", "--optim_args"),
        (dict(optim_args="eps=nan"), "eps", "--optim_args"),
        (dict(optim_args="normalize=mean"), "normalize", "--optim_args"),
        (dict(optim_args="scale_rule=sqrt"), "scale_rule", "--optim_args"),
        (dict(optim_args="maximize=perhaps"), "maximize", "--optim_args"),
        (dict(optim_args="momentum"), "momentum", "--optim_args"),
        (dict(optim_args="momentum_dtype=int8"), "momentum_dtype", "--optim_args"),
        (dict(optim_args="fused=true,foreach=true"), "fused", "--optim_args"),
        (dict(learning_rate=-1e-3), "lr", "--learning_rate"),
        (dict(weight_decay=-0.1), "weight_decay", "--weight_decay"),
    ],
)
def test_bad_optim_args_fail_before_training(tmp_path, overrides, key, source):
    """The message names the key and the flag the value came from (``--optim_args`` for its keys: the optimizer's own
    range checks, e.g. momentum=2, included), where the arguments are built (a script parses them, before its data
    preprocessing) and again when a Trainer is built with values changed since."""
    named = rf"{re.escape(source)}.*\b{key}\b"
    with pytest.raises(ValueError, match=named):
        training_args(tmp_path, **overrides)
    args = training_args(tmp_path)
    for name, value in overrides.items():  # changed after they were built: the Trainer refuses them
        setattr(args, name, value)
    with pytest.raises(ValueError, match=named):
        Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset())
    if "=" in (args.optim_args or "="):  # transformers' own parser fails first on an entry without '='
        with pytest.raises(ValueError, match=named):
            Trainer.get_optimizer_cls_and_kwargs(args)


def test_adam_mini_hyperparameters_name_their_flag(tmp_path):
    pytest.importorskip("adam_mini", reason="adam-mini is in the test extra")
    with pytest.raises(ValueError, match=r"--adam_epsilon.*\beps=-1"):
        Trainer.get_optimizer_cls_and_kwargs(training_args(tmp_path, optim="adam_mini", adam_epsilon=-1.0))


# --------------------------------------------------------------------------- GSNRCallback


def _train(tmp_path, model=None, **overrides):
    model = model if model is not None else tiny_gpt2()
    trainer = Trainer(model=model, args=training_args(tmp_path, **overrides), train_dataset=TokenDataset())
    trainer.train()
    return trainer


def test_training_writes_gsnr_json_and_logs_summary(tmp_path):
    trainer = _train(tmp_path, weight_decay=0.01)
    sai = find_sgd_sai(trainer.optimizer)
    assert sai is not None
    report = json.loads((tmp_path / "gsnr.json").read_text())
    named = dict(trainer.model.named_parameters())
    assert set(report) == {n for n, p in named.items() if p.requires_grad}
    for name, entry in report.items():
        assert set(entry) == {"gsnr", "scale", "numel", "gsnr_over_sqrt_numel"}
        assert entry["numel"] == named[name].numel()
        assert entry["gsnr_over_sqrt_numel"] == pytest.approx(entry["gsnr"] / math.sqrt(entry["numel"]), rel=1e-12)
        assert entry["scale"] == sai.state[named[name]]["scale"]
        assert math.isfinite(entry["gsnr"]) and entry["gsnr"] > 0
    summary = next(log for log in trainer.state.log_history if "gsnr/scale_max" in log)
    scales = [e["scale"] for e in report.values()]
    assert summary["gsnr/scale_min"] == min(scales) and summary["gsnr/scale_max"] == max(scales)
    assert summary["gsnr/deferred"] == 0 and summary["gsnr/scaled"] == len(report)
    assert summary["step"] == 1


@pytest.fixture
def sai_hf_log_level():
    """The ``sai_hf`` logger without a level of its own (as in a script that never configured it); restored after."""
    package_logger = logging.getLogger("sai_hf")
    saved, verbosity = package_logger.level, transformers_logging.get_verbosity()
    package_logger.setLevel(logging.NOTSET)
    yield package_logger
    package_logger.setLevel(saved)
    transformers_logging.set_verbosity(verbosity)


def test_the_report_path_is_logged_where_the_trainer_logs_info(tmp_path, caplog, sai_hf_log_level):
    """run_clm.py turns transformers' verbosity to INFO on the main process (``log_level`` left passive): the line saying
    where gsnr.json went shows with the Trainer's own INFO lines; a default (quiet) run shows none; a level the user gave
    the ``sai_hf`` logger wins."""
    def report_lines(run: str, **overrides) -> list[str]:
        caplog.clear()
        _train(tmp_path / run, max_steps=1, **overrides)
        return [r.getMessage() for r in caplog.records if r.name == "sai_hf.callback"]

    assert report_lines("quiet") == []
    assert sai_hf_log_level.level == logging.NOTSET  # a quiet run does not quieten a logger configured elsewhere
    transformers_logging.set_verbosity_info()
    (line,) = report_lines("run_clm")
    report = tmp_path / "run_clm" / "gsnr.json"
    assert str(report.resolve()) in line and f"of {len(json.loads(report.read_text()))} blocks" in line
    sai_hf_log_level.setLevel(logging.WARNING)
    assert report_lines("user_chose_warning") == []


def test_readme_lists_every_metric_the_callback_logs(tmp_path):
    trainer = Trainer(
        model=tiny_gpt2(), args=training_args(tmp_path, max_steps=2), train_dataset=TokenDataset(),
        callbacks=[GSNRCallback(track_every=2)],
    )
    trainer.train()
    logged = {key for log in trainer.state.log_history for key in log if key.startswith(("gsnr/", "gsnr_drift/"))}
    assert {"gsnr/scaled", "gsnr/deferred", "gsnr_drift/spearman"} <= logged
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    listed = {
        prefix + option
        for prefix, options in re.findall(r"\b(gsnr(?:_drift)?/[a-z_]*)(?:\{([a-z_,]+)\})?", readme)
        for option in (options.split(",") if options else [""])
    }
    assert not logged - listed, f"README.md does not list {sorted(logged - listed)}"


def test_gradient_accumulation_gives_the_big_batch_gsnr(tmp_path):
    big = _train(tmp_path / "big", max_steps=1, per_device_train_batch_size=8)
    accumulated = _train(tmp_path / "acc", max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=4)
    want = json.loads((tmp_path / "big" / "gsnr.json").read_text())
    got = json.loads((tmp_path / "acc" / "gsnr.json").read_text())
    assert set(want) == set(got)
    for name in want:
        assert got[name]["gsnr"] == pytest.approx(want[name]["gsnr"], rel=1e-5), name
    del big, accumulated


def test_lora_deferred_blocks_are_scaled_later_and_reported(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = _train(tmp_path, model=model, learning_rate=0.1, max_steps=5)
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p.detach(), start[name]), f"{name} did not move"
    report = json.loads((tmp_path / "gsnr.json").read_text())
    assert set(report) == set(start)
    first = next(log for log in trainer.state.log_history if "gsnr/deferred" in log)
    assert first["step"] == 1 and first["gsnr/deferred"] == 4  # every lora_A waits for lora_B to move
    later = [log for log in trainer.state.log_history if "gsnr/deferred" in log][-1]
    assert later["gsnr/deferred"] == 0 and later["step"] > 1
    lora_a = [v["gsnr"] for n, v in report.items() if "lora_A" in n]
    assert all(8 < g < 20 for g in lora_a), lora_a  # scale-free g-SNR of a 4x64 block, ~sqrt(256)


def test_the_optimizer_step_scales_and_the_callback_registers_once(tmp_path, monkeypatch):
    """One entry point: the scales come from SGDSaI.step; the callback registers the model once per
    run (not at every step while a block, e.g. a never-used one, waits) and only reports."""
    calls = {"register_model": 0, "initialize_scales": 0}
    for name in calls:
        original = getattr(SGDSaI, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(SGDSaI, name, counted)
    model = tiny_gpt2()
    unused = torch.nn.Parameter(torch.randn(4, 4))  # never receives a gradient: never scaled
    model.register_parameter("unused_head", unused)
    trainer = _train(tmp_path, model=model, max_steps=4)
    assert calls == {"register_model": 1, "initialize_scales": 0}
    sai = find_sgd_sai(trainer.optimizer)
    assert not sai.has_scale(unused) and not sai.all_blocks_scaled()
    report = json.loads((tmp_path / "gsnr.json").read_text())
    assert "unused_head" not in report and len(report) == len(sai.scales())


def test_the_callback_stops_asking_for_blocks_once_every_block_is_scaled(tmp_path, monkeypatch):
    """The optimizer rebuilds its blocks at every call: the callback asks for them at the steps that may bring new
    scales, not at every step once every block has its scale (its calls do not grow with the run's length)."""
    asked = []
    original = SGDSaI.blocks

    def counted(self, *args, **kwargs):
        frame = sys._getframe(1)
        while frame is not None and Path(frame.f_code.co_filename).name != "callback.py":
            frame = frame.f_back
        if frame is not None:  # asked for by the callback (directly or through SGDSaI.scales() and the like)
            asked.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SGDSaI, "blocks", counted)
    counts = []
    for steps in (2, 6):
        asked.clear()
        trainer = _train(tmp_path / str(steps), max_steps=steps)
        assert find_sgd_sai(trainer.optimizer).all_blocks_scaled()
        counts.append(len(asked))
    assert counts[0] == counts[1] > 0, counts


def test_callback_added_by_hand_is_harmless(tmp_path):
    trainer = Trainer(
        model=tiny_gpt2(), args=training_args(tmp_path), train_dataset=TokenDataset(), callbacks=[GSNRCallback()]
    )
    assert sum(isinstance(cb, GSNRCallback) for cb in trainer.callback_handler.callbacks) == 2
    trainer.train()
    assert len([log for log in trainer.state.log_history if "gsnr/scale_max" in log]) == 1


def test_callback_is_inert_for_other_optimizers(tmp_path):
    _train(tmp_path, optim="adamw_torch")
    assert not (tmp_path / "gsnr.json").exists()


# --------------------------------------------------------------------------- --optim adam_mini


def test_adam_mini_trains_through_the_same_registry(tmp_path):
    pytest.importorskip("adam_mini", reason="adam-mini is in the test extra")
    model = tiny_llama()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _train(tmp_path, model=model, optim="adam_mini", learning_rate=1e-3, weight_decay=0.1)
    assert type(trainer.optimizer.optimizer).__name__ == "Adam_mini"
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), start[n])]
    assert len(moved) == len(start)
    assert not (tmp_path / "gsnr.json").exists()


def test_adam_mini_trains_lora_adapters(tmp_path):
    """Adam-mini on a PEFT model: LoRA factors of q_proj/k_proj are not cut into attention heads
    (that crashed at the first step); every adapter tensor trains, one second moment per row."""
    pytest.importorskip("adam_mini", reason="adam-mini is in the test extra")
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"])
    model = peft.get_peft_model(tiny_llama(), config)
    trainer = _train(tmp_path, model=model, optim="adam_mini", learning_rate=1e-2, max_steps=3)
    inner = trainer.optimizer.optimizer
    lora = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    assert all(p.detach().abs().max() > 0 for n, p in lora.items() if "lora_B" in n)  # moved from zero
    for p in lora.values():
        state = inner.state[p]
        assert state["vmean"].shape == (p.shape[0], 1)  # one second moment per row


def test_adam_mini_missing_package_names_the_extra(tmp_path, monkeypatch):
    import importlib.util as util

    real_find_spec = util.find_spec
    monkeypatch.setattr(util, "find_spec", lambda name, *a: None if name == "adam_mini" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match=r"sai-hf\[adam-mini\]"):
        Trainer(model=tiny_llama(), args=training_args(tmp_path, optim="adam_mini"), train_dataset=TokenDataset())


# --------------------------------------------------------------------------- GSNRCallback: unused heads, dropped gradients, resumed histories, hand-added callbacks (found attacking the callback)
def _history(path: Path) -> dict:
    return json.loads(path.read_text())


def _drift_logs(trainer: Trainer) -> list[dict]:
    return [log for log in trainer.state.log_history if "gsnr_drift/spearman" in log]


@pytest.fixture(autouse=True)
def _no_track_env(monkeypatch):
    monkeypatch.delenv(TRACK_EVERY_ENV, raising=False)


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


# --------------------------------------------------------------------------- settings named before training: $SAI_HF_GSNR_TRACK_EVERY, --optim_args
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
        training_args(tmp_path, optim_args=optim_args)
    args = training_args(tmp_path)
    args.optim_args = optim_args
    with pytest.raises(ValueError, match=re.escape(named)):
        Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset())


@pytest.mark.parametrize("optim_args", ["momentum=0.9", " momentum = 0.8 , eps=1e-6 ", "fused=none,momentum_dtype=bf16", ""])
def test_accepted_optim_args_are_splittable_by_transformers(tmp_path, optim_args):
    args = training_args(tmp_path, optim_args=optim_args)
    Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset())  # our check accepts it ...
    Trainer.get_optimizer_cls_and_kwargs(args)  # ... and so must what train() runs (5.x: transformers' own parser first)
