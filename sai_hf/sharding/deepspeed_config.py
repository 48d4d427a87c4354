"""Which DeepSpeed configuration is in use, and refusing, before training, the ones SGD-SaI cannot
run exactly: ZeRO stage 3, ``offload_optimizer`` / ``offload_param``, an ``optimizer`` section
(DeepSpeed would replace SGD-SaI). Stages 0, 1 and 2 pass."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from .base import UnsupportedShardingError

__all__ = [
    "deepspeed_config",
    "deepspeed_in_use",
    "refuse_unsupported_zero",
    "refuse_unsupported_deepspeed",
    "DEEPSPEED_ZERO3_MESSAGE",
]

DEEPSPEED_ZERO3_MESSAGE = (
    "SGD-SaI (--optim sgd_sai) does not support DeepSpeed ZeRO stage 3 yet: the parameters are partitioned "
    "before the optimizer exists, so per-tensor g-SNR statistics cannot be attributed exactly. Use ZeRO "
    "stage 2 (configs/deepspeed/zero2.json) or FSDP2 (configs/accelerate/fsdp.yaml), both exact."
)
_OFFLOAD_MESSAGE = (
    "SGD-SaI (--optim sgd_sai) does not support DeepSpeed zero_optimization.{key} (device {device!r}) yet: "
    "the offloaded step path is not covered by sai-hf's exact per-tensor g-SNR. Remove {key} and use ZeRO "
    "stage 2 (configs/deepspeed/zero2.json) or FSDP2."
)
_OPTIMIZER_SECTION_MESSAGE = (
    "--optim sgd_sai with a DeepSpeed config that has an 'optimizer' section: DeepSpeed would build "
    "its own optimizer and SGD-SaI would not be used. Remove the 'optimizer' section (see "
    "configs/deepspeed/zero2.json)."
)


def deepspeed_config(args: Any = None) -> dict[str, Any] | None:
    """The DeepSpeed config in use as a dict (``args.hf_deepspeed_config``, ``args.deepspeed`` as a
    dict or JSON path, or accelerate's DeepSpeed plugin), or ``None`` if unknown."""
    hf_config = getattr(args, "hf_deepspeed_config", None)
    if hf_config is not None and isinstance(getattr(hf_config, "config", None), dict):
        return hf_config.config
    value = getattr(args, "deepspeed", None)
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and os.path.isfile(value):
        with open(value, encoding="utf-8") as fh:
            return json.load(fh)
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is None:
        from accelerate.state import AcceleratorState

        plugin = AcceleratorState._shared_state.get("deepspeed_plugin")
    config = getattr(plugin, "deepspeed_config", None)
    return config if isinstance(config, dict) else None


def _offload_device(section: Any) -> str | None:
    """The device of an ``offload_*`` section, ``None`` where nothing is offloaded."""
    if not isinstance(section, Mapping):
        return None
    device = str(section.get("device", "none")).lower()
    return None if device in ("none", "", "null") else device


def refuse_unsupported_zero(config: Mapping[str, Any] | None) -> None:
    """Raise :class:`~sai_hf.sharding.base.UnsupportedShardingError` naming the first key of a
    DeepSpeed config that SGD-SaI cannot run exactly (see the module docstring)."""
    if not config:
        return
    zero = config.get("zero_optimization") or {}
    if str(zero.get("stage", 0)) == "3":
        raise UnsupportedShardingError(DEEPSPEED_ZERO3_MESSAGE)
    for key in ("offload_optimizer", "offload_param"):
        device = _offload_device(zero.get(key))
        if device is not None:
            raise UnsupportedShardingError(_OFFLOAD_MESSAGE.format(key=key, device=device))
    if "optimizer" in config:
        raise UnsupportedShardingError(_OPTIMIZER_SECTION_MESSAGE)


def deepspeed_in_use(args: Any = None) -> bool:
    """Whether DeepSpeed is configured: ``args.deepspeed`` (TrainingArguments), the DeepSpeed plugin
    that transformers derives from ``accelerate launch`` (``args.deepspeed_plugin``), the environment
    ``accelerate launch`` sets (``ACCELERATE_USE_DEEPSPEED``), or an initialised accelerate state."""
    if args is not None and (getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None) is not None):
        return True
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").strip().lower() in ("1", "true", "yes", "y", "on"):
        return True
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    return getattr(AcceleratorState, "_shared_state", {}).get("distributed_type") == DistributedType.DEEPSPEED


def refuse_unsupported_deepspeed(args: Any = None) -> None:
    """If DeepSpeed is in use, :func:`refuse_unsupported_zero` of its config."""
    if deepspeed_in_use(args):
        refuse_unsupported_zero(deepspeed_config(args))
