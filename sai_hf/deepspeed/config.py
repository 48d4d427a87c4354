"""Which DeepSpeed configuration is in use, and refusing, before training, the ones SGD-SaI cannot
run exactly. Stages 0 to 3 pass, with ``offload_optimizer`` (``device: cpu``, stages 2 and 3, with
``"zero_force_ds_cpu_optimizer": false``: otherwise DeepSpeed insists on its own CPU Adam) and
``offload_param`` (``device: cpu``, stage 3). Refused: NVMe offload, ``offload_param`` below stage
3, optimizer offload at stage 1, partial optimizer offload at stage 3 (``offload_optimizer.ratio``
below 1: DeepSpeed's hybrid optimizer supports its own CPU Adam only), ZenFlow, SuperOffload, loading
a universal checkpoint (it holds no scales), and an ``optimizer`` section (DeepSpeed would replace
SGD-SaI)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from ..sharding.base import UnsupportedShardingError

__all__ = ["deepspeed_config", "deepspeed_in_use", "refuse_unsupported_deepspeed"]

_OFFLOAD_DEVICE_MESSAGE = (
    "SGD-SaI (--optim sgd_sai) does not support DeepSpeed zero_optimization.{key} with device {device!r}: "
    "only device 'cpu' is covered by sai-hf's exact per-tensor g-SNR (NVMe swaps the optimizer state in "
    "and out, which sai-hf's per-block state does not follow). Use device 'cpu' "
    "(configs/deepspeed/zero3_offload.json, configs/deepspeed/zero2_offload.json)."
)
_OFFLOAD_STAGE_MESSAGE = (
    "SGD-SaI (--optim sgd_sai) with DeepSpeed zero_optimization.{key} at ZeRO stage {stage}: {what} Use "
    "{use}."
)
_FORCE_CPU_OPTIMIZER_MESSAGE = (
    "--optim sgd_sai with DeepSpeed zero_optimization.offload_optimizer (device 'cpu') needs "
    "\"zero_force_ds_cpu_optimizer\": false in the DeepSpeed config (it is {value!r}): otherwise DeepSpeed "
    "insists on its own CPU optimizer (DeepSpeedCPUAdam) instead of SGD-SaI. Add "
    "\"zero_force_ds_cpu_optimizer\": false (as configs/deepspeed/zero2_offload.json and zero3_offload.json do)."
)
_PARTIAL_OFFLOAD_MESSAGE = (
    "SGD-SaI (--optim sgd_sai) with DeepSpeed zero_optimization.offload_optimizer.ratio = {ratio!r}: below 1, "
    "ZeRO stage 3 offloads only part of the optimizer and steps the rest with a hybrid optimizer that supports "
    "DeepSpeed's own CPU Adam only (train() would fail with \"Hybrid Optimizer Only Supports DeepSpeedCPUAdam\"). "
    "Remove offload_optimizer.ratio (or set it to 1.0), as configs/deepspeed/zero3_offload.json does."
)
_UNSUPPORTED_FEATURE_MESSAGE = (
    "SGD-SaI (--optim sgd_sai) does not support DeepSpeed {key}: {why} Remove it (see configs/deepspeed/)."
)
_UNIVERSAL_CHECKPOINT_MESSAGE = (
    "SGD-SaI (--optim sgd_sai) with DeepSpeed checkpoint.load_universal: a universal checkpoint restores "
    "tensors per parameter but not SGD-SaI's per-block scales, which would then be measured again from a "
    "later gradient. Resume from the DeepSpeed checkpoint at the world size it was saved with (DeepSpeed "
    "refuses another), or start the optimizer afresh from the saved model weights."
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


def _refuse_config(config: Mapping[str, Any] | None) -> None:
    """Raise :class:`~sai_hf.sharding.base.UnsupportedShardingError` naming the first key of a
    DeepSpeed config that SGD-SaI cannot run exactly (see the module docstring)."""
    if not config:
        return
    zero = config.get("zero_optimization") or {}
    stage = str(zero.get("stage", 0))
    optimizer_offload = _offload_device(zero.get("offload_optimizer"))
    param_offload = _offload_device(zero.get("offload_param"))
    for key, device in (("offload_optimizer", optimizer_offload), ("offload_param", param_offload)):
        if device is not None and device != "cpu":
            raise UnsupportedShardingError(_OFFLOAD_DEVICE_MESSAGE.format(key=key, device=device))
    if optimizer_offload is not None and stage not in ("2", "3"):
        raise UnsupportedShardingError(
            _OFFLOAD_STAGE_MESSAGE.format(
                key="offload_optimizer", stage=stage, what="sai-hf covers optimizer offload at stages 2 and 3.",
                use="ZeRO stage 2 (configs/deepspeed/zero2_offload.json) or 3 (configs/deepspeed/zero3_offload.json)",
            )
        )
    if param_offload is not None and stage != "3":
        raise UnsupportedShardingError(
            _OFFLOAD_STAGE_MESSAGE.format(
                key="offload_param", stage=stage, what="parameter offload is a ZeRO stage 3 feature.",
                use="ZeRO stage 3 (configs/deepspeed/zero3_offload.json), or ZeRO stage 2 without offload_param "
                "(configs/deepspeed/zero2.json)",
            )
        )
    ratio = zero["offload_optimizer"].get("ratio", 1.0) if optimizer_offload is not None else 1.0
    if stage == "3" and isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and ratio < 1.0:
        raise UnsupportedShardingError(_PARTIAL_OFFLOAD_MESSAGE.format(ratio=ratio))
    if optimizer_offload is not None and config.get("zero_force_ds_cpu_optimizer", True) is not False:
        raise UnsupportedShardingError(_FORCE_CPU_OPTIMIZER_MESSAGE.format(value=config.get("zero_force_ds_cpu_optimizer", True)))
    if zero.get("zenflow"):
        raise UnsupportedShardingError(
            _UNSUPPORTED_FEATURE_MESSAGE.format(key="zero_optimization.zenflow", why="ZenFlow runs its own CPU optimizer step.")
        )
    if isinstance(zero.get("offload_optimizer"), Mapping) and zero["offload_optimizer"].get("super_offload"):
        raise UnsupportedShardingError(
            _UNSUPPORTED_FEATURE_MESSAGE.format(
                key="zero_optimization.offload_optimizer.super_offload", why="SuperOffload runs its own CPU optimizer step."
            )
        )
    checkpoint = config.get("checkpoint")
    if isinstance(checkpoint, Mapping) and checkpoint.get("load_universal"):
        raise UnsupportedShardingError(_UNIVERSAL_CHECKPOINT_MESSAGE)
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
    """If DeepSpeed is in use, :func:`_refuse_config` of its config."""
    if deepspeed_in_use(args):
        _refuse_config(deepspeed_config(args))
