"""Parameter names as the user's model has them: without the components that wrappers (DDP, FSDP1, activation
checkpointing, ``torch.compile``) insert. The callback's report and history are keyed by them."""

from __future__ import annotations

import torch

__all__ = ["WRAPPER_COMPONENTS", "clean_parameter_name", "unwrap_model", "parameter_names"]

#: Module names that wrappers insert into parameter names (FSDP1, activation checkpointing, ``torch.compile``).
WRAPPER_COMPONENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


def clean_parameter_name(name: str) -> str:
    """``name`` without wrapper components: ``_fsdp_wrapped_module.h.0._checkpoint_wrapped_module.w`` -> ``h.0.w``."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_COMPONENTS)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's model inside DDP / DataParallel and ``torch.compile`` wrappers (FSDP1's are kept: its shard views)."""
    parallel = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    for _ in range(8):
        if isinstance(model, parallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            break
    return model


def parameter_names(model: torch.nn.Module) -> dict[int, str]:
    """``id(parameter) -> name`` as in the unwrapped model's ``named_parameters()``, wrapper components removed."""
    return {id(p): clean_parameter_name(name) for name, p in unwrap_model(model).named_parameters()}
