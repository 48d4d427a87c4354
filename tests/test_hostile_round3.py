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
