"""What a state dict handed to :meth:`sai_hf.SGDSaI.load_state_dict` is, checked before it is loaded.

A Trainer checkpoint can come from anywhere: this package (any version), the official ``sgd-sai``
package (``SGD_sai``), another optimizer (AdamW, torch SGD, ...), or a model of other shapes. Loading
the wrong one silently would train with garbage momentum (or, through a fused kernel reading a
buffer of the wrong size, corrupt memory). :func:`prepare_state_dict` therefore

* recognises the kind of state dict (:func:`state_dict_kind`) from its keys;
* **imports** the official package's state exactly: its per-block ``gsnr`` (a 0-d tensor) is the
  scale it trained with (``scale = gsnr``, i.e. ``normalize="none"``) and its ``momentum_buffer``
  is SGD-SaI's momentum, so the run continues as the official code would, with sai-hf's update;
* **refuses** any other optimizer's state with a ``ValueError`` that says what the checkpoint is;
* checks every buffer against its parameter (shape, floating dtype) and every scale, naming the
  parameter index and both shapes.

:func:`buffers_in_saved_dtype` undoes torch's cast of the state to the parameter dtype on load: a
``momentum_dtype=torch.bfloat16`` buffer comes back bfloat16 (half the memory, bit-exact resume), a
float32 buffer of a bfloat16 parameter comes back float32 (unrounded).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .sharding import extra_state_keys

__all__ = ["SGDSAI_STATE_KEYS", "state_dict_kind", "prepare_state_dict", "buffers_in_saved_dtype"]

#: Keys a block's state may have in an SGDSaI state dict (any version of this package), and those the
#: sharding layouts add (a DeepSpeed ZeRO flat partition's state: :mod:`sai_hf.sharding.deepspeed_zero`).
SGDSAI_STATE_KEYS = frozenset({"momentum_buffer", "gsnr", "scale", "step", "gsnr_eps_free"}) | extra_state_keys()
#: Keys of a parameter group that only this package writes.
_SGDSAI_GROUP_KEY = "normalize"
#: Keys of the official package's parameter groups and block state.
_OFFICIAL_GROUP_KEYS = frozenset({"lr", "momentum", "eps", "weight_decay"})
_OFFICIAL_STATE_KEYS = frozenset({"gsnr", "momentum_buffer"})

#: Tell-tale keys of other optimizers, for the error message.
_KNOWN_FOREIGN = (
    ({"exp_avg", "exp_avg_sq"}, "Adam/AdamW (exp_avg, exp_avg_sq)"),
    ({"exp_avg", "exp_avg_sq_row"}, "Adafactor"),
    ({"square_avg"}, "RMSprop/Adadelta (square_avg)"),
    ({"sum"}, "Adagrad (sum)"),
    ({"momentum_buffer"}, "torch.optim.SGD (momentum_buffer without g-SNR scales)"),
)
_KNOWN_FOREIGN_GROUP_KEYS = (
    ({"betas"}, "Adam/AdamW or another Adam-family optimizer (betas)"),
    ({"nesterov", "dampening"}, "torch.optim.SGD (nesterov, dampening)"),
    ({"alpha", "centered"}, "RMSprop (alpha, centered)"),
)


def _block_states(state_dict: Mapping[str, Any]) -> Mapping[Any, Mapping[str, Any]]:
    state = state_dict.get("state")
    if not isinstance(state, Mapping):
        raise ValueError(f"Not an optimizer state dict: expected a 'state' mapping, got keys {sorted(map(str, state_dict))}")
    return state


def state_dict_kind(state_dict: Mapping[str, Any]) -> str:
    """``"sgd_sai"`` (this package), ``"official"`` (``sgd-sai``'s ``SGD_sai``), or a description of
    the foreign optimizer it looks like (starting with ``"foreign"``)."""
    groups = state_dict.get("param_groups")
    if not isinstance(groups, Sequence) or not all(isinstance(g, Mapping) for g in groups):
        raise ValueError("Not an optimizer state dict: expected a 'param_groups' list of mappings")
    state = _block_states(state_dict)
    state_keys = set().union(*(set(v) for v in state.values() if isinstance(v, Mapping)))
    group_keys = set().union(*(set(g) for g in groups)) - {"params", "param_names"}
    if _SGDSAI_GROUP_KEY in group_keys and state_keys <= SGDSAI_STATE_KEYS:
        return "sgd_sai"
    if group_keys == _OFFICIAL_GROUP_KEYS and state_keys <= _OFFICIAL_STATE_KEYS:
        return "official"
    for keys, name in _KNOWN_FOREIGN:
        if keys <= state_keys and not ({"gsnr", "scale"} & state_keys):
            return f"foreign: {name}"
    for keys, name in _KNOWN_FOREIGN_GROUP_KEYS:
        if keys <= group_keys:
            return f"foreign: {name}"
    return f"foreign: unknown (block state keys {sorted(state_keys)}, group keys {sorted(group_keys)})"


def _import_official(optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The official package's state dict as this package's: ``scale = gsnr = float(gsnr)``,
    ``momentum_buffer`` kept, ``step`` 1 (the official code keeps no count; it only seeds stochastic
    rounding here), groups completed with this optimizer's own options and ``normalize="none"``."""
    state: dict[Any, dict[str, Any]] = {}
    for key, entry in _block_states(state_dict).items():
        converted: dict[str, Any] = {}
        if "gsnr" in entry:
            gsnr = float(torch.as_tensor(entry["gsnr"]).item())
            converted.update(gsnr=gsnr, scale=gsnr, gsnr_eps_free=False)
        if "momentum_buffer" in entry:
            converted.update(momentum_buffer=entry["momentum_buffer"], step=1)
        state[key] = converted
    finite = [e["gsnr"] for e in state.values() if "gsnr" in e and math.isfinite(e["gsnr"])]
    groups = []
    for saved, own in zip(state_dict["param_groups"], optimizer.param_groups):
        group = {k: v for k, v in own.items() if k != "params"}
        group.update({k: saved[k] for k in _OFFICIAL_GROUP_KEYS}, params=saved["params"], normalize="none")
        group["gsnr_max"] = max(finite) if finite else None
        groups.append(group)
    warnings.warn(
        f"SGDSaI: importing an official sgd-sai (SGD_sai) optimizer state: {len(finite)} block g-SNR value(s) "
        "become the scales (normalize='none', the official rule) and the momentum buffers are kept.",
        stacklevel=3,
    )
    return {"state": state, "param_groups": groups}


def _describe(t: Any) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else f"a {type(t).__name__}"


def _check_blocks(optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any]) -> None:
    """Every loaded block state against the parameter it will belong to."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    if len(saved_ids) != len(params):
        raise ValueError(
            f"Optimizer state dict has {len(saved_ids)} parameters in {len(state_dict['param_groups'])} group(s); "
            f"this optimizer has {len(params)} in {len(optimizer.param_groups)}"
        )
    position = {saved: i for i, saved in enumerate(saved_ids)}
    for key, entry in _block_states(state_dict).items():
        if key not in position:
            raise ValueError(f"Optimizer state dict has state for parameter id {key!r}, which no parameter group lists")
        index = position[key]
        param = params[index]
        buf = entry.get("momentum_buffer")
        if buf is not None:
            if not isinstance(buf, Tensor) or tuple(buf.shape) != tuple(param.shape):
                raise ValueError(
                    f"Optimizer state dict does not fit parameter #{index}: its momentum buffer has "
                    f"{_describe(buf)}, the parameter has shape {tuple(param.shape)} (a checkpoint of another model?)"
                )
            if not (buf.is_floating_point() or buf.is_complex()):
                raise ValueError(f"Optimizer state dict: momentum buffer of parameter #{index} has dtype {buf.dtype}")
        for name in ("scale", "gsnr"):
            value = entry.get(name)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise ValueError(f"Optimizer state dict: {name} of parameter #{index} is {value!r}, expected a float")
            if value is not None and not (math.isnan(value) or (math.isfinite(value) and value >= 0)):
                raise ValueError(f"Optimizer state dict: {name} of parameter #{index} is {value!r}")


def prepare_state_dict(optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """``state_dict`` checked (and, for the official package, converted) for ``optimizer``; raises
    ``ValueError`` for another optimizer's state or state that does not fit the parameters."""
    kind = state_dict_kind(state_dict)
    if kind.startswith("foreign"):
        raise ValueError(
            f"This optimizer state dict is not SGD-SaI's: it looks like {kind.removeprefix('foreign: ')}. "
            "SGDSaI loads state dicts written by sai_hf.SGDSaI or by the official sgd-sai package; to switch "
            "optimizers, start without the optimizer state (e.g. load the model weights only)."
        )
    if kind == "official":
        state_dict = _import_official(optimizer, state_dict)
    _check_blocks(optimizer, state_dict)
    return state_dict


def buffers_in_saved_dtype(optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any]) -> None:
    """After ``Optimizer.load_state_dict`` (which casts every state tensor to its parameter's
    dtype), put back each momentum buffer in the dtype it was saved in, on its parameter's device."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    position = {saved: i for i, saved in enumerate(i for g in state_dict["param_groups"] for i in g["params"])}
    for key, entry in state_dict["state"].items():
        saved = entry.get("momentum_buffer")
        param = params[position[key]]
        loaded = optimizer.state.get(param, {}).get("momentum_buffer")
        if saved is not None and loaded is not None and loaded.dtype != saved.dtype:
            optimizer.state[param]["momentum_buffer"] = saved.to(device=loaded.device)
