"""What a sharded optimizer's parameters do not reveal, told once after wrapping: :func:`register_sharded_model`."""

from __future__ import annotations

from typing import Any

import torch

from .deepspeed import find_zero_optimizer
from .optimizer import wrappers

__all__ = ["register_sharded_model"]


def register_sharded_model(model: torch.nn.Module, optimizer: Any) -> int:
    """Tell ``optimizer`` (an :class:`sai_hf.SGDSaI`, possibly wrapped) which of ``model``'s parameters are FSDP1
    ``use_orig_params=True`` shard views (FSDP1 leaves them unmarked), and which optimizer wraps it (DeepSpeed
    ZeRO-1/2's: pass ``engine.optimizer``); idempotent, returns the number of parameters recorded. Plain-PyTorch FSDP1
    needs it (once, after wrapping and building the optimizer), and plain DeepSpeed ZeRO-1/2 with several parameter
    groups for ``normalize="max"``; the Trainer's callback does it."""
    chain, sai = wrappers(optimizer)
    if sai is None:
        raise TypeError("register_sharded_model: optimizer is not an sai_hf.SGDSaI (nor wraps one)")
    find_zero_optimizer(sai, chain)
    return sai.register_model(model)
