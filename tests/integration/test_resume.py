"""Resuming continues exactly: scales and momentum come from the checkpoint, never recomputed."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _models import TokenDataset, tiny_gpt2, training_args
from transformers import Trainer

from sai_hf import find_sgd_sai
from _scripts import load_module

WORKER = Path(__file__).resolve().parents[1] / "workers" / "resume_worker.py"


def _run(mode: str, out: Path) -> None:
    # Same intra-op thread count as this process: CPU reductions are only bitwise reproducible then.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    subprocess.run([sys.executable, str(WORKER), mode, str(out)], check=True, cwd=WORKER.parent, env=env)


def test_resume_in_fresh_process_is_bit_exact(tmp_path):
    main = load_module(WORKER, "resume_worker").main
    main("full", tmp_path)
    main("first", tmp_path)
    _run("resume", tmp_path)  # a fresh interpreter: nothing survives but the checkpoint
    full = torch.load(tmp_path / "full.pt")
    resumed = torch.load(tmp_path / "resume.pt")
    for name, tensor in full.items():
        assert torch.equal(tensor, resumed[name]), name


def test_trainer_resume_from_checkpoint_keeps_scales(tmp_path):
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, weight_decay=0.01)
    straight = Trainer(model=tiny_gpt2(), args=training_args(tmp_path / "a", **common), train_dataset=TokenDataset())
    straight.train()

    first = Trainer(model=tiny_gpt2(), args=training_args(tmp_path / "b", **common), train_dataset=TokenDataset())
    first.train()
    checkpoint = tmp_path / "b" / "checkpoint-3"
    saved_scales = json.loads((tmp_path / "b" / "gsnr.json").read_text())

    resumed = Trainer(model=tiny_gpt2(seed=123), args=training_args(tmp_path / "b", **common), train_dataset=TokenDataset())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    sai = find_sgd_sai(resumed.optimizer)
    named = dict(resumed.model.named_parameters())
    for name, entry in saved_scales.items():
        assert sai.state[named[name]]["scale"] == entry["scale"], name
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


def test_resumed_run_logs_the_restored_gsnr_summary_at_its_first_logging_step(tmp_path):
    """The ``gsnr/*`` summary of the restored scales is in the resumed run's first log, at its own logging step
    (logging every 3 steps, resumed at step 4: step 6), not in an extra log the summary would force."""
    common = dict(max_steps=6, save_strategy="steps", save_steps=4, logging_steps=3)
    first = Trainer(model=tiny_gpt2(), args=training_args(tmp_path, **common), train_dataset=TokenDataset())
    first.train()
    (scaled_at_start,) = [log for log in first.state.log_history if "gsnr/scaled" in log]
    assert scaled_at_start["step"] == 1

    resumed = Trainer(model=tiny_gpt2(), args=training_args(tmp_path, **common), train_dataset=TokenDataset())
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    after = [log for log in resumed.state.log_history if log["step"] > 4 and "loss" in log]
    assert [log["step"] for log in after] == [6]
    summary = {key: value for key, value in scaled_at_start.items() if key.startswith("gsnr/")}
    assert set(summary) == {"gsnr/scaled", "gsnr/deferred", "gsnr/scale_min", "gsnr/scale_median", "gsnr/scale_max"}
    assert {key: after[0][key] for key in summary} == summary


# --------------------------------------------------------------------------- checkpoints written by other runs: the official sgd-sai under a Trainer, training_args.bin
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
