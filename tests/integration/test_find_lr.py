"""The learning-rate range test: ``python -m sai_hf.find_lr`` and ``sai_hf.find_lr.lr_find``.

The script under test is ``tests/workers/lr_find_script.py`` (a tiny GPT-2 on a learnable toy
language; after ``train()`` it saves, evaluates and writes a marker). Most runs go through
:func:`sai_hf.find_lr.main` in this process; one runs the command line in a subprocess (its last
printed line) and one under ``torchrun`` with 2 CPU processes (gloo).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from _launch import child_env, free_port, launch

from sai_hf import find_lr
from sai_hf.lr_rule import NoDecreaseError, Smoother, diverged, ramp_lr, suggest

HERE = Path(__file__).resolve().parents[1] / "workers"
SCRIPT = HERE / "lr_find_script.py"
ROOT = HERE.parent  # the repository root (the package is importable from there)
while not (ROOT / "sai_hf").is_dir() and ROOT != ROOT.parent:
    ROOT = ROOT.parent
LAST_LINE = re.compile(r"^suggested learning_rate: ([0-9.e+-]+)$")
BASE_ARGS = [
    "--use_cpu", "true", "--per_device_train_batch_size", "8", "--report_to", "none", "--seed", "0",
    "--data_seed", "0", "--disable_tqdm", "true", "--logging_steps", "50", "--dataloader_num_workers", "0",
]  # fmt: skip
FAST = ["--steps", "40", "--start-lr", "1e-4", "--end-lr", "30"]


def script_args(out: Path, *extra: str) -> list[str]:
    return [str(SCRIPT), "--output_dir", str(out), *BASE_ARGS, *extra]


def script_env() -> dict[str, str]:
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_cli(cmd: list[str], timeout: float = 240) -> tuple[int, str, float]:
    """(exit code, stdout + ``--- stderr:`` + stderr, seconds) of ``cmd`` run from the repository root."""
    rc, seconds, output = launch(cmd, cwd=ROOT, timeout=timeout, env=script_env(), stderr_apart=True)
    return rc, output, seconds


def check_curve(payload: dict, start: float, end: float, steps: int) -> None:
    lrs = payload["lrs"]
    assert lrs[0] == pytest.approx(start)
    assert len(lrs) <= steps
    ratio = (end / start) ** (1 / (steps - 1))
    for a, b in zip(lrs, lrs[1:]):
        assert b / a == pytest.approx(ratio, rel=1e-6)
    assert len(payload["losses"]) == len(payload["smoothed"]) == len(lrs)
    assert payload["method"] == "steepest_capped"
    assert lrs[0] <= payload["suggestion"] <= end
    candidates = payload["candidates"]
    assert candidates["steepest_capped"] == payload["suggestion"]
    assert payload["suggestion"] == min(candidates["steepest"], candidates["loss_min"] / 2)


# --------------------------------------------------------------------------- the rule (pure)
def test_ramp_smoother_and_divergence():
    assert ramp_lr(0, 1e-6, 10.0, 100) == pytest.approx(1e-6)
    assert ramp_lr(99, 1e-6, 10.0, 100) == pytest.approx(10.0)
    assert ramp_lr(50, 1e-4, 1e-2, 101) == pytest.approx(1e-3)
    smoother = Smoother(0.9)
    assert smoother.add(5.0) == pytest.approx(5.0)  # bias correction: the first value is the loss itself
    assert smoother.add(3.0) == pytest.approx((0.09 * 5 + 0.1 * 3) / (1 - 0.81))
    assert diverged(float("nan"), 1.0, 1.0, 4.0) and diverged(float("inf"), 1.0, 1.0, 4.0)
    assert diverged(9.0, 4.1, 1.0, 4.0) and diverged(1.0, 3.9, 1.0, 4.0) is None


def test_suggestion_rules_on_a_synthetic_curve():
    lrs = [ramp_lr(i, 1e-5, 10.0, 61) for i in range(61)]
    # flat, falls between 1e-3 and 1e-1 (steepest near 1e-2), lowest at 0.1, then rises
    loss = [3.0 - 2.0 / (1 + math.exp(-2 * (math.log10(lr) + 2))) + (5 * (math.log10(lr) + 1) ** 2 if lr > 0.1 else 0) for lr in lrs]
    found = suggest(lrs, loss, "min_div_10")
    low = min(range(61), key=lambda i: loss[i])
    assert found.lr == pytest.approx(lrs[low] / 10)
    assert 0.05 < lrs[low] < 0.2
    steep = suggest(lrs, loss, "steepest").lr
    assert 3e-3 < steep < 3e-2
    assert suggest(lrs, loss).method == "steepest_capped"
    assert suggest(lrs, loss).lr == steep  # well below half the minimum's rate: the steepest point itself
    assert 1e-4 < suggest(lrs, loss, "valley").lr < 0.2
    assert set(found.candidates) == {"steepest_capped", "min_div_10", "steepest", "valley", "loss_min"}
    # a curve that falls faster and faster until it blows up (SGD-like): capped at half the minimum's rate
    cliff = [3.0 - 0.02 * i**1.5 if i <= 40 else 50.0 for i in range(61)]
    edge = suggest(lrs, cliff)
    assert edge.candidates["steepest"] == pytest.approx(lrs[39])
    assert edge.lr == pytest.approx(lrs[40] / 2)
    with pytest.raises(NoDecreaseError, match="never fell more than 1% between lr"):
        suggest(lrs, [3.0] * 61)
    noisy_start = [2.0] + [3.0 + 0.01 * math.sin(i) for i in range(40)] + [9.0] * 20  # one lucky first batch, flat, diverges
    with pytest.raises(NoDecreaseError, match="moved less than its batch-to-batch noise before it diverged"):
        suggest(lrs, noisy_start)
    # with the raw losses: a fall counts when it beats 3x the smoothed loss's noise
    import random

    rng = random.Random(0)
    jitter = [rng.gauss(0.0, 0.3) for _ in range(61)]
    dip = [5.8 + j - (0.25 if 30 <= i < 45 else 0.0) + (3.0 if i >= 45 else 0.0) for i, j in enumerate(jitter)]
    flat = [5.8 + j + (3.0 if i >= 45 else 0.0) for i, j in enumerate(jitter)]
    for curve, clear in ((dip, True), (flat, False)):
        smoother = Smoother(0.95)
        smoothed = [smoother.add(x) for x in curve]
        if clear:
            assert lrs[30] <= suggest(lrs, smoothed, losses=curve, beta=0.95).candidates["loss_min"] <= lrs[45]
        else:
            with pytest.raises(NoDecreaseError, match="never fell more than 3x its noise"):
                suggest(lrs, smoothed, losses=curve, beta=0.95)
    with pytest.raises(NoDecreaseError, match="diverged at once"):
        suggest(lrs, [3.0, float("nan")] + [None] * 59)
    with pytest.raises(ValueError, match="unknown suggestion method"):
        suggest(lrs, loss, "magic")


# --------------------------------------------------------------------------- command line
def test_cli_end_to_end_last_line_and_nothing_written(tmp_path):
    """sgd_sai with --optim_args, checkpoints every step, evaluation every step, gradient
    accumulation, max_steps below --steps and a resume flag: the test runs its own steps, writes
    only lr_find.json / lr_find.png, and its last line is the suggestion."""
    out = tmp_path / "out"
    marker = tmp_path / "marker"
    cmd = [sys.executable, "-m", "sai_hf.find_lr", *FAST, *script_args(
        out, "--optim", "sgd_sai", "--optim_args", "momentum=0.9,normalize=none", "--learning_rate", "0.5",
        "--save_strategy", "steps", "--save_steps", "1", "--eval_strategy", "steps", "--eval_steps", "1",
        "--eval_on_start", "true", "--gradient_accumulation_steps", "2", "--max_steps", "3", "--logging_strategy", "no",
        "--warmup_steps", "10", "--lr_scheduler_type", "cosine", "--resume_from_checkpoint", str(tmp_path / "nowhere"),
        "--marker", str(marker),
    )]  # fmt: skip
    rc, output, seconds = run_cli(cmd)
    print(f"\n[cli] {seconds:.1f} s")
    assert rc == 0, output
    stdout = output.split("\n--- stderr:")[0].strip().splitlines()
    match = LAST_LINE.match(stdout[-1])
    assert match, output
    assert "ignoring train(resume_from_checkpoint" in output
    assert sorted(p.name for p in out.iterdir()) == ["lr_find.json", "lr_find.png"]
    assert not marker.exists()
    payload = json.loads((out / "lr_find.json").read_text())
    check_curve(payload, 1e-4, 30.0, 40)
    assert float(match.group(1)) == pytest.approx(payload["suggestion"], rel=1e-2)
    assert payload["settings"]["gradient_accumulation_steps"] == 2
    assert len(payload["lrs"]) > 3  # more than the script's max_steps
    assert "diverged" in payload["stop_reason"]  # 30 is far past what this model takes


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    code = find_lr.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("extra", [["--optim", "adamw_torch"], ["--optim", "sgd_sai", "--mode", "lora"]], ids=["adamw", "lora"])
def test_other_optimizers_and_lora(tmp_path, capsys, extra):
    out = tmp_path / "out"
    report = tmp_path / "report"
    code, stdout, stderr = run_main([*FAST, "--output", report, *script_args(out, *extra)], capsys)
    assert code == 0, stderr
    assert LAST_LINE.match(stdout.strip().splitlines()[-1])
    assert not any(out.iterdir())  # --output elsewhere: Trainer() made the output_dir, nothing went in
    payload = json.loads((report / "lr_find.json").read_text())
    check_curve(payload, 1e-4, 30.0, 40)
    assert payload["settings"]["optim"] == extra[1]


def test_bad_input_gets_one_clear_line(tmp_path, capsys):
    out = tmp_path / "out"
    cases = [
        ([*FAST[:2], "--start-lr", "1", "--end-lr", "0.1", *script_args(out)], 2, "--start-lr (1) must be below --end-lr (0.1)"),
        (["--steps", "2", *script_args(out)], 2, "--steps must be an integer of at least 5"),
        (["--start-lr", "fast", *script_args(out)], 2, "--start-lr: 'fast' is not a valid float"),
        (["--method", "magic", *script_args(out)], 2, "--method must be one of"),
        (["--warmup", "3", *script_args(out)], 2, "unknown option '--warmup'"),
        ([tmp_path / "missing.py"], 2, "can't open file"),
        (["--output", SCRIPT, "--", *script_args(out)], 2, "is a file, not a directory"),
        (["--", "--steps", "5"], 2, "unknown option '--steps': give a script"),
        ([], 2, "no script given"),
        (["-m", "no_such_module_xyz"], 2, "no module named 'no_such_module_xyz'"),
        ([*script_args(out, "--mode", "no_trainer")], 2, "ended without calling transformers.Trainer.train()"),
        ([*script_args(out, "--mode", "exit_before_train")], 3, "exited (status 3) before calling Trainer.train()"),
        ([*FAST, *script_args(out, "--mode", "frozen", "--optim", "adamw_torch")], 1, "never fell more than 3x its noise"),
        (["--start-lr", "1e3", "--end-lr", "1e9", "--steps", "10", *script_args(out, "--optim", "sgd_sai")], 1, "diverged at once"),
    ]
    for argv, expected, message in cases:
        code, stdout, stderr = run_main(argv, capsys)
        assert code == expected, (argv, stdout, stderr)
        assert message in stderr, (argv, stderr)
        assert "Traceback" not in stderr + stdout
        assert stderr.strip().splitlines()[-1].startswith("python -m sai_hf.find_lr: error: "), stderr
        if expected == 1:  # the test ran: its curve is kept (no suggestion) to help choose another range
            payload = json.loads((out / "lr_find.json").read_text())
            assert payload["suggestion"] is None and payload["error"] in stderr
            (out / "lr_find.json").unlink()
            (out / "lr_find.png").unlink()
        assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())


def test_script_that_catches_exceptions_and_two_trainers(tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = run_main([*FAST, *script_args(out, "--optim", "sgd_sai", "--mode", "catch_all")], capsys)
    assert code == 0 and "caught" not in stdout, stdout + stderr
    assert sorted(p.name for p in out.iterdir()) == ["lr_find.json", "lr_find.png"]
    out2 = tmp_path / "out2"
    code, stdout, stderr = run_main(
        [*FAST, "--skip-trains", "1", *script_args(out2, "--optim", "sgd_sai", "--mode", "two_trainers")], capsys
    )
    assert code == 0, stderr
    assert json.loads((out2 / "lr_find.json").read_text())["lrs"][0] == pytest.approx(1e-4)
    from transformers import Trainer

    for name in ("train", "save_model", "_save_checkpoint", "save_state", "save_metrics"):  # the hooks are gone
        assert getattr(Trainer, name).__module__.startswith("transformers."), name


# --------------------------------------------------------------------------- Python API
def api_trainer(out: Path, **overrides):
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    from lr_find_script import build
    from _models import training_args
    kwargs = dict(per_device_train_batch_size=8, save_strategy="steps", save_steps=1, eval_strategy="steps",
                  eval_steps=2, logging_steps=50)  # fmt: skip
    kwargs.update(overrides)
    return build(training_args(out, **kwargs), "normal")


def test_api_returns_result_restores_model_and_trainer_trains_after(tmp_path):
    from transformers import TrainerCallback

    written = tmp_path / "integration_log"
    # what a report_to integration (tensorboard, wandb...) is to the test: a callback from transformers.integrations
    Integration = type("FakeIntegrationCallback", (TrainerCallback,), {
        "__module__": "transformers.integrations.fake",
        "on_log": lambda self, args, state, control, **kw: written.write_text("logged") and None,
    })  # fmt: skip
    out = tmp_path / "out"
    trainer = api_trainer(out, learning_rate=0.05, max_steps=2)
    trainer.add_callback(Integration())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    result = find_lr.lr_find(trainer, start_lr=1e-4, end_lr=30, steps=40, verbose=False)
    assert isinstance(result, find_lr.LRFindResult)
    assert result.lrs[0] == pytest.approx(1e-4) and len(result.lrs) == len(result.losses)
    assert 1e-4 <= result.suggestion <= 30 and result.method == "steepest_capped"
    assert sorted(p.name for p in out.iterdir()) == ["lr_find.json", "lr_find.png"]
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert trainer.args.max_steps == 2 and trainer.args.output_dir == str(out)
    assert trainer.lr_scheduler is None and trainer.optimizer is None
    assert not written.exists()
    trainer.args.learning_rate = result.suggestion
    trainer.args.save_strategy = "no"
    trainer.train()  # a normal run afterwards: fresh optimizer (its SGD-SaI scales from this run's first step)
    assert trainer.state.global_step == 2
    assert trainer.lr_scheduler.get_last_lr()[0] != result.lrs[1]  # the script's schedule, not the ramp
    with pytest.raises(ValueError, match="start_lr .* must be below end_lr"):
        find_lr.lr_find(trainer, start_lr=1.0, end_lr=1.0)


def test_interrupted_run_leaves_trainer_and_output_dir_as_they_were(tmp_path, capsys):
    out = tmp_path / "cli"
    code, stdout, stderr = run_main([*FAST, *script_args(out, "--mode", "interrupt")], capsys)
    assert code == 130 and "interrupted: the range test wrote nothing" in stderr, stderr
    assert not any(out.iterdir())

    from lr_find_script import Interrupt  # noqa: E402 - api_trainer put tests/workers on the path before

    out = tmp_path / "out"
    trainer = api_trainer(out, max_steps=7)
    trainer.add_callback(Interrupt())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    callbacks = list(trainer.callback_handler.callbacks)
    with pytest.raises(KeyboardInterrupt):
        find_lr.lr_find(trainer, steps=40, verbose=False)
    assert not out.exists() or not any(out.iterdir())
    assert trainer.args.max_steps == 7 and trainer.args.eval_on_start is False and trainer.args.logging_nan_inf_filter
    assert trainer.args.output_dir == str(out) and trainer.callback_handler.callbacks == callbacks
    assert "create_scheduler" not in vars(trainer)
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, before[n]), n


# --------------------------------------------------------------------------- 2 processes
@pytest.mark.slow
def test_torchrun_two_processes_one_decision(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           "-m", "sai_hf.find_lr", *FAST, *script_args(out, "--optim", "sgd_sai", "--per_device_train_batch_size", "4",
                                                        "--save_strategy", "steps", "--save_steps", "2")]  # fmt: skip
    rc, output, seconds = run_cli(cmd)
    print(f"\n[torchrun] 2 processes: {seconds:.1f} s")
    assert rc == 0, output[-4000:]
    stdout = output.split("\n--- stderr:")[0].strip().splitlines()
    assert LAST_LINE.match(stdout[-1]), output[-4000:]
    assert sum(bool(LAST_LINE.match(line)) for line in stdout) == 1  # rank 0 speaks for both
    assert sorted(p.name for p in out.iterdir()) == ["lr_find.json", "lr_find.png"]
    payload = json.loads((out / "lr_find.json").read_text())
    assert payload["settings"]["world_size"] == 2
    check_curve(payload, 1e-4, 30.0, 40)



# --------------------------------------------------------------------------- a ramp that is not applied
def has_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:  # ImportError, or a broken build
        return False
    return True


@pytest.mark.skipif(not has_deepspeed(), reason="deepspeed not installed")
@pytest.mark.parametrize("section", ["scheduler", "none", "optimizer"])
def test_deepspeed_config_with_its_own_scheduler_is_refused(tmp_path, section):
    """A DeepSpeed config with a ``scheduler`` section: DeepSpeed's scheduler, not the ramp, set the rate (0 here),
    while the curve recorded the ramp up to --end-lr over a flat loss. Refused at the first step, nothing written.
    Without it (the guard against refusing what works) the ramp is applied and recorded: also with an ``optimizer``
    section (AdamW), where DeepSpeed's engine steps the ramp itself. One process: DeepSpeed's engine on CPU, gloo."""
    config = json.loads((ROOT / "configs" / "deepspeed" / "zero2.json").read_text())
    optim = "sgd_sai"
    if section == "scheduler":
        config["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"}}
    if section == "optimizer":
        config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}
        optim = "adamw_torch"  # sai-hf refuses an optimizer section under sgd_sai
    (tmp_path / "ds.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    env = script_env()
    env.update(DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    cmd = [sys.executable, "-m", "sai_hf.find_lr", "--steps", "8", "--start-lr", "1e-4", "--end-lr", "30",
           *script_args(out, "--optim", optim, "--deepspeed", str(tmp_path / "ds.json"))]  # fmt: skip
    rc, seconds, output = launch(cmd, cwd=ROOT, timeout=240, env=env, stderr_apart=True)
    print(f"\n[deepspeed, {section} section] {seconds:.1f} s")
    stdout, _, stderr = output.partition("\n--- stderr:\n")
    if section != "scheduler":
        assert rc in (0, 1) and "the ramp was not applied" not in stderr, output[-4000:]  # 1: no suggestion, curve kept
        lrs = json.loads((out / "lr_find.json").read_text())["lrs"]
        assert lrs == pytest.approx([ramp_lr(i, 1e-4, 30.0, 8) for i in range(len(lrs))], rel=1e-6)
        return
    assert rc == 1, output[-4000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("python -m sai_hf.find_lr: error: the ramp was not applied"), last
    assert "WarmupLR" in last and "'scheduler' section" in last
    assert "lr_find step" not in stdout  # stopped before the first step
    assert not out.exists() or not any(out.iterdir())


def test_rate_changed_behind_the_ramp_is_refused(tmp_path):
    """Whatever else sets the optimizer's rate (here a callback, as a scheduler of its own would) is found by
    comparing the rate the next step applies with the one the ramp set."""
    from transformers import TrainerCallback

    class Pin(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            for group in optimizer.param_groups:
                group["lr"] = 1e-3

    trainer = api_trainer(tmp_path / "out", max_steps=2)
    trainer.add_callback(Pin())
    with pytest.raises(find_lr.LRFindError, match=r"the ramp was not applied: the optimizer's first parameter group runs at lr 0\.001"):
        find_lr.lr_find(trainer, start_lr=1e-4, end_lr=30, steps=10, verbose=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_loss_rising_from_the_first_rate_asks_for_a_lower_start(tmp_path, capsys):
    """The ramp starts where this model already diverges (sgd_sai from 0.3): the hint said "a higher --start-lr"."""
    out = tmp_path / "out"
    code, stdout, stderr = run_main(["--steps", "20", "--start-lr", "0.3", "--end-lr", "30", *script_args(out, "--optim", "sgd_sai")], capsys)
    assert code == 1, stdout + stderr
    last = stderr.strip().splitlines()[-1]
    assert "the loss rose from the first rate on" in last and "a lower --start-lr (now 0.3" in last, last
    assert "higher --start-lr" not in last
    assert json.loads((out / "lr_find.json").read_text())["suggestion"] is None  # the curve is kept


def test_temporary_output_dir_is_not_logged(tmp_path, caplog):
    """The Trainer's output_dir during the test is a temporary folder, removed afterwards: sai-hf's INFO line
    "g-SNR report ... written to <that folder>/gsnr.json" pointed nowhere."""
    import logging

    caplog.set_level(logging.INFO, logger="sai_hf")
    trainer = api_trainer(tmp_path / "out", max_steps=2, log_level="info")
    find_lr.lr_find(trainer, start_lr=1e-4, end_lr=30, steps=10, verbose=False)
    assert not [r.getMessage() for r in caplog.records if "sai_hf_lr_find_" in r.getMessage()]
    trainer.args.save_strategy = "no"
    trainer.train()  # a normal run afterwards: its report is announced as before
    assert any("gsnr.json" in r.getMessage() and str(tmp_path / "out") in r.getMessage() for r in caplog.records)
