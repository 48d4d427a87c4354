"""sai_hf.compat: the one place where transformers 4.57 and 5.x differ for sai-hf.

The dispatch is tested here on stand-ins, so it runs on whichever line is installed; the Trainer tests run it for
real on the installed line (``make test-versions LEG=floor`` runs them on 4.57)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
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


# --------------------------------------------------------------------------- registration costs nothing until transformers loads
IMPORT_ONLY_PROBE = """
import json, sys
import sai_hf
seen = {"after_import": sorted(name for name in ("torch", "transformers", "transformers.training_args", "transformers.trainer")
                               if name in sys.modules)}
sai_hf.SGDSaI, sai_hf.sgd_sai, sai_hf.gradient_statistics, sai_hf.statistics_reducer, sai_hf.__version__
seen["transformers_after_the_optimizer"] = "transformers" in sys.modules
json.dump(seen, sys.stdout)
"""

REGISTRATION_PROBE = """
import json, sys
order, output_dir = sys.argv[1:]
if order == "trainer_before":
    import transformers.trainer
elif order == "training_args_before":
    from transformers import TrainingArguments
import sai_hf
seen = {"after_import": sorted(name for name in ("transformers.training_args", "transformers.trainer") if name in sys.modules)}
from transformers import HfArgumentParser, TrainingArguments
(args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
    ["--output_dir", output_dir, "--optim", "sgd_sai", "--optim_args", "momentum=0.8", "--learning_rate", "0.5",
     "--use_cpu", "true", "--report_to", "none"])
seen["optim"] = repr(args.optim)
seen["trainer_imported_to_parse"] = "transformers.trainer" in sys.modules
try:
    TrainingArguments(output_dir=output_dir, optim="sgd_sai", optim_args="momentun=0.9", use_cpu=True, report_to="none")
except ValueError as err:
    seen["bad_optim_args"] = str(err).split(";")[0]
import torch
from transformers import Trainer, trainer
optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, torch.nn.Linear(2, 2))
optimizer = optimizer_cls(torch.nn.Linear(2, 2).parameters(), **kwargs)
seen["optimizer"] = [type(optimizer).__name__, kwargs["lr"], kwargs["momentum"]]
seen["callbacks"] = [cls.__name__ for cls in trainer.DEFAULT_CALLBACKS]
json.dump(seen, sys.stdout)
"""


def _fresh_python(code: str, *argv: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def test_import_sai_hf_imports_neither_torch_nor_transformers():
    """``import sai_hf`` costs next to nothing (issue 29): no torch, no transformers (whose ``trainer`` took 4-11 s);
    the optimizer's names come on first access, still without transformers."""
    assert _fresh_python(IMPORT_ONLY_PROBE) == {"after_import": [], "transformers_after_the_optimizer": False}


@pytest.mark.parametrize("order", ["after", "training_args_before", "trainer_before"])
def test_sgd_sai_registers_whether_transformers_is_imported_before_or_after(order, tmp_path):
    """--optim sgd_sai parses (HfArgumentParser's choices), --optim_args are checked where TrainingArguments are built,
    and the Trainer builds SGDSaI, with transformers imported after sai_hf (registered as each module loads: parsing
    needs no Trainer) or before it (registered on import)."""
    seen = _fresh_python(REGISTRATION_PROBE, order, str(tmp_path))
    assert seen["after_import"] == {
        "after": [], "training_args_before": ["transformers.training_args"],
        "trainer_before": ["transformers.trainer", "transformers.training_args"],
    }[order]  # fmt: skip
    assert seen["optim"] == "<OptimizerNames.SGD_SAI: 'sgd_sai'>"
    assert seen["trainer_imported_to_parse"] == (order == "trainer_before")
    assert seen["bad_optim_args"] == "--optim_args for sgd_sai: unknown key 'momentun'"
    assert seen["optimizer"] == ["SGDSaI", 0.5, 0.8]
    assert seen["callbacks"][-3:] == ["OptimArgsCheck", "ImportedSchedulerAlignment", "AutoGSNRCallback"]
