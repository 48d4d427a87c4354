"""What sai-hf needs from transformers that the 4.57 line and the 5.x line provide differently, in one place.

transformers 5.2+ dispatches ``--optim`` names through a table, ``transformers.trainer_optimizer._OPTIMIZER_HANDLERS``
(``name -> handler(OptimizerContext) -> (optimizer class or factory, kwargs)``), read by
``Trainer.get_optimizer_cls_and_kwargs``. 4.57, 5.0 and 5.1 have no table: that static method is one if/elif chain
ending in "unsupported optimizer". There :func:`optimizer_handlers` puts a :class:`HandlerDispatch` in front of the
chain: a table of its own, consulted first, with the 5.2 handler signature and factory protocol, so sai-hf's
registration is the same code on every release. :func:`training_argument_name` maps the ``TrainingArguments`` fields
newer releases renamed (``activation_checkpointing``) to the installed release's names. Everything else sai-hf uses
(``OptimizerNames``, ``DEFAULT_CALLBACKS``, ``on_pre_optimizer_step``, ``processing_class``, ``loss_type``,
``Accelerator.end_training``) exists in both lines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "SUPPORTED_TRANSFORMERS", "RENAMED_TRAINING_ARGUMENTS", "OptimizerContext", "FactoryCall", "HandlerDispatch",
    "optimizer_handlers", "check_installed_transformers", "training_argument_name",
]  # fmt: skip

#: The transformers releases sai-hf runs on (pyproject.toml's ``dependencies`` too: tests/unit/test_compat.py).
SUPPORTED_TRANSFORMERS = ">=4.57.1,<6"

#: ``TrainingArguments`` fields that newer transformers renamed: the new name -> the name 4.57 (and early 5.x) use.
#: A recipe config or command line may use the new names on every supported release.
RENAMED_TRAINING_ARGUMENTS = {
    "activation_checkpointing": "gradient_checkpointing",
    "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs",
}


def training_argument_name(name: str) -> str:
    """The installed ``TrainingArguments``' name of the field called ``name`` (an older name only where the
    installed release lacks the newer one; any other ``name`` unchanged)."""
    old = RENAMED_TRAINING_ARGUMENTS.get(name)
    if old is None:
        return name
    import dataclasses

    from transformers import TrainingArguments

    return name if any(f.name == name for f in dataclasses.fields(TrainingArguments)) else old


@dataclass
class OptimizerContext:
    """The fields of transformers 5's ``trainer_optimizer.OptimizerContext`` that an optimizer handler reads."""

    args: Any
    model: Any
    optimizer_kwargs: dict[str, Any]


class FactoryCall:
    """The optimizer-factory protocol of transformers 5.2+, on earlier releases. A handler may return a factory
    instead of an optimizer class (anything but a ``torch.optim.Optimizer`` subclass), which 5.2+ builds as
    ``factory()(model, **kwargs)``; earlier releases always build ``returned(param_groups, **kwargs)``. Returned in the
    factory's place, this builds ``factory()(model, **kwargs)`` when called that way (the Trainer's param groups are
    not the factory's input)."""

    def __init__(self, factory: Callable[[], Callable[..., Any]], model: Any) -> None:
        if model is None:
            raise ValueError(f"the optimizer factory {factory!r} needs the model: get_optimizer_cls_and_kwargs(args, model)")
        self.factory = factory
        self.model = model

    def __call__(self, param_groups: Any, **kwargs: Any) -> Any:
        return self.factory()(self.model, **kwargs)


class HandlerDispatch:
    """The stand-in for ``_OPTIMIZER_HANDLERS`` before 5.2: installed as ``Trainer.get_optimizer_cls_and_kwargs``,
    it answers the ``--optim`` names in :attr:`handlers` and leaves every other name to transformers' own chain."""

    def __init__(self, builtin: Callable[..., tuple[Any, Any]]) -> None:
        self.builtin = builtin
        self.handlers: dict[str, Callable[[Any], tuple[Any, dict[str, Any]]]] = {}

    def __call__(self, args: Any, model: Any = None) -> tuple[Any, Any]:
        handler = self.handlers.get(args.optim)
        if handler is None:
            return self.builtin(args, model)
        optimizer_cls, kwargs = handler(OptimizerContext(args=args, model=model, optimizer_kwargs={"lr": args.learning_rate}))
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
            optimizer_cls = FactoryCall(optimizer_cls, model)
        return optimizer_cls, kwargs


def _check_supported(version: str) -> None:
    from packaging.specifiers import SpecifierSet

    if not SpecifierSet(SUPPORTED_TRANSFORMERS).contains(version, prereleases=True):
        raise ImportError(f"sai-hf needs transformers{SUPPORTED_TRANSFORMERS} (found {version})")


def check_installed_transformers() -> None:
    """``ImportError`` naming :data:`SUPPORTED_TRANSFORMERS` unless the imported transformers is in that range."""
    import transformers

    _check_supported(transformers.__version__)


def optimizer_handlers() -> dict:
    """The table of ``--optim`` handlers that ``Trainer.get_optimizer_cls_and_kwargs`` consults: transformers' own
    ``_OPTIMIZER_HANDLERS`` (5.2+), else the :class:`HandlerDispatch` installed on ``Trainer`` (once per process)."""
    check_installed_transformers()
    try:
        from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS
    except ImportError:  # 4.57, 5.0, 5.1: an if/elif chain
        pass
    else:
        return _OPTIMIZER_HANDLERS
    from transformers import Trainer

    installed = Trainer.__dict__["get_optimizer_cls_and_kwargs"]
    dispatch = getattr(installed, "__func__", installed)  # a staticmethod, unless someone replaced it
    if not isinstance(dispatch, HandlerDispatch):
        dispatch = HandlerDispatch(dispatch)
        Trainer.get_optimizer_cls_and_kwargs = staticmethod(dispatch)
    return dispatch.handlers
