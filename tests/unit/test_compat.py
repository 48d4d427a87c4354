"""sai_hf.compat: the one place where transformers 4.57 and 5.x differ for sai-hf.

The dispatch is tested here on stand-ins, so it runs on whichever line is installed; the Trainer tests run it for
real on the installed line (``make test-versions LEG=floor`` runs them on 4.57)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments

import sai_hf
from sai_hf.compat import SUPPORTED_TRANSFORMERS, FactoryCall, HandlerDispatch, _check_supported, optimizer_handlers

REPO = Path(__file__).resolve().parents[2]


def test_supported_range_is_the_one_pyproject_declares():
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"transformers{SUPPORTED_TRANSFORMERS}" in dependencies


@pytest.mark.parametrize("version", ["4.56.2", "6.0.0", "3.0.0"])
def test_unsupported_transformers_is_named(version):
    with pytest.raises(ImportError, match=re.escape(f"sai-hf needs transformers{SUPPORTED_TRANSFORMERS} (found {version})")):
        _check_supported(version)


@pytest.mark.parametrize("version", ["4.57.1", "4.57.6", "5.0.0", "5.2.0", "5.24.0", "5.99.0.dev0"])
def test_supported_transformers_passes(version):
    _check_supported(version)


class _Args:
    def __init__(self, optim):
        self.optim, self.learning_rate = optim, 0.25


def test_dispatch_answers_its_names_and_leaves_the_others_to_transformers():
    seen = []
    dispatch = HandlerDispatch(lambda args, model=None: ("builtin", {"optim": args.optim, "model": model}))
    dispatch.handlers["mine"] = lambda ctx: seen.append(ctx) or (torch.optim.SGD, {**ctx.optimizer_kwargs, "momentum": 0.5})
    model = torch.nn.Linear(2, 2)
    assert dispatch(_Args("adamw_torch"), model) == ("builtin", {"optim": "adamw_torch", "model": model})
    assert dispatch(_Args("mine"), model) == (torch.optim.SGD, {"lr": 0.25, "momentum": 0.5})
    assert seen[0].model is model and seen[0].args.optim == "mine"


def test_a_factory_handler_is_built_from_the_model_as_transformers_5_does():
    """transformers 5 builds a handler's factory as ``factory()(model, **kwargs)``; 4.57 calls what the handler
    returned with the Trainer's param groups, so the dispatch returns a FactoryCall in its place."""
    built = []

    class Factory:
        def __call__(self, model, **kwargs):
            built.append((model, kwargs))
            return torch.optim.SGD(model.parameters(), **kwargs)

    dispatch = HandlerDispatch(lambda args, model=None: None)
    dispatch.handlers["factory"] = lambda ctx: (Factory, ctx.optimizer_kwargs)
    model = torch.nn.Linear(2, 2)
    optimizer_cls, kwargs = dispatch(_Args("factory"), model)
    assert isinstance(optimizer_cls, FactoryCall)
    optimizer = optimizer_cls([{"params": ["the Trainer's groups are not the factory's input"]}], **kwargs)
    assert isinstance(optimizer, torch.optim.SGD) and built == [(model, {"lr": 0.25})]
    with pytest.raises(ValueError, match="needs the model"):
        dispatch(_Args("factory"))


def test_the_table_is_installed_once_and_routes_sgd_sai(tmp_path):
    assert optimizer_handlers() is optimizer_handlers()
    installed = Trainer.__dict__["get_optimizer_cls_and_kwargs"]
    sai_hf.register()
    assert Trainer.__dict__["get_optimizer_cls_and_kwargs"] is installed  # no dispatch wrapped around a dispatch
    args = TrainingArguments(output_dir=str(tmp_path), optim="sgd_sai", optim_args="momentum=0.8", learning_rate=0.5, report_to="none")
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, torch.nn.Linear(2, 2))
    assert optimizer_cls is sai_hf.SGDSaI and kwargs["lr"] == 0.5 and kwargs["momentum"] == 0.8
    adamw = TrainingArguments(output_dir=str(tmp_path), optim="adamw_torch", report_to="none")
    assert Trainer.get_optimizer_cls_and_kwargs(adamw)[0] is torch.optim.AdamW  # transformers' own names still work
