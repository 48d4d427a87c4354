"""Resuming continues exactly: scales and momentum come from the checkpoint, never recomputed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from _models import TokenDataset, tiny_gpt2, training_args
from transformers import Trainer

from sai_hf import find_sgd_sai

WORKER = Path(__file__).with_name("_resume_worker.py")


def _run(mode: str, out: Path) -> None:
    # Same intra-op thread count as this process: CPU reductions are only bitwise reproducible then.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    subprocess.run([sys.executable, str(WORKER), mode, str(out)], check=True, cwd=WORKER.parent, env=env)


def test_resume_in_fresh_process_is_bit_exact(tmp_path):
    from _resume_worker import main

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
