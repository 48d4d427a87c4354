"""What a state dict handed to :meth:`sai_hf.SGDSaI.load_state_dict` is, checked before it is loaded.

Loading the wrong checkpoint silently would train with garbage momentum (or, through a fused kernel reading a buffer of
the wrong size, corrupt memory). :func:`prepare_state_dict` recognises the kind (:func:`state_dict_kind`); **imports**
the official ``sgd-sai`` state exactly (its per-block ``gsnr`` is the scale it trained with, ``normalize="none"``, and
its ``momentum_buffer`` is kept); **refuses** any other optimizer's state with a ``ValueError`` saying what it is; and
checks every buffer (shape, floating dtype) and scale against its parameter, naming the parameter index and both shapes.
:func:`buffers_in_saved_dtype` undoes torch's cast of the state to the parameter dtype on load (a bfloat16 buffer comes
back bfloat16, a float32 buffer of a bfloat16 parameter float32).
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["SGDSAI_STATE_KEYS", "align_scheduler", "buffers_in_saved_dtype", "prepare_state_dict", "remember_parameter_order",
           "state_dict_kind", "user_stacklevel"]  # fmt: skip

#: Keys a block's state may have in an SGDSaI state dict (any version of this package); the sharding backends add
#: theirs (a DeepSpeed ZeRO flat partition's state: :mod:`sai_hf.deepspeed`).
SGDSAI_STATE_KEYS = frozenset({"momentum_buffer", "gsnr", "scale", "step", "gsnr_eps_free"})
#: Keys of a parameter group that only this package writes.
_SGDSAI_GROUP_KEY = "normalize"
#: Keys of the official package's parameter groups and block state.
_OFFICIAL_GROUP_KEYS = frozenset({"lr", "momentum", "eps", "weight_decay"})
_OFFICIAL_STATE_KEYS = frozenset({"gsnr", "momentum_buffer"})
#: Keys torch's LR schedulers add to parameter groups (``initial_lr``: every scheduler; the others: ``OneCycleLR``,
#: ``CyclicLR``), which an official state dict may carry (``param_names`` too, torch >= 2.6).
_SCHEDULER_GROUP_KEYS = frozenset({"initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum"})

#: Files whose frames a warning skips to reach its caller's line: sai-hf's and torch's (``torch.no_grad``'s wrapper, the
#: optimizer's step hooks).
_INTERNAL_PREFIXES = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, torch.__file__))


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` made by the function calling this one, such that the warning
    names the first line outside sai-hf and torch: the user's ``opt.step()`` or ``load_state_dict(...)`` line (or
    the library that made that call: transformers' Trainer, accelerate, DeepSpeed), not ``torch.no_grad``'s wrapper
    in ``torch/utils/_contextlib.py`` or sai-hf's own frames, however many lie between (they differ by path and
    torch version). Python 3.12's ``skip_file_prefixes`` does the same; walking the frames works on every version."""
    frame = sys._getframe(2)  # the caller's caller: stacklevel 2
    level = 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL_PREFIXES):
        frame = frame.f_back
        level += 1
    return level


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


def state_dict_kind(
    state_dict: Mapping[str, Any], backend_state_keys: frozenset[str] = frozenset(), other_layouts: frozenset[str] = frozenset()
) -> str:
    """``"sgd_sai"`` (this package; block state keys of :data:`SGDSAI_STATE_KEYS` or ``backend_state_keys``, those of
    the sharding backends of the parameters loading it), ``"official"`` (``sgd-sai``'s ``SGD_sai``), ``"layout: KEYS"``
    (this package's, with block state keys ``KEYS`` of ``other_layouts``, other backends': a DeepSpeed ZeRO
    partition's state loaded into whole tensors), or a description of the foreign optimizer it looks like (starting
    with ``"foreign"``)."""
    groups = state_dict.get("param_groups")
    if not isinstance(groups, Sequence) or not all(isinstance(g, Mapping) for g in groups):
        raise ValueError("Not an optimizer state dict: expected a 'param_groups' list of mappings")
    state = _block_states(state_dict)
    state_keys = set().union(*(set(v) for v in state.values() if isinstance(v, Mapping)))
    group_keys = set().union(*(set(g) for g in groups)) - {"params", "param_names"}
    if _SGDSAI_GROUP_KEY in group_keys and state_keys <= SGDSAI_STATE_KEYS | backend_state_keys:
        return "sgd_sai"
    extra = state_keys - SGDSAI_STATE_KEYS - backend_state_keys
    if _SGDSAI_GROUP_KEY in group_keys and extra <= other_layouts:
        return f"layout: {sorted(extra)}"
    if _OFFICIAL_GROUP_KEYS <= group_keys <= _OFFICIAL_GROUP_KEYS | _SCHEDULER_GROUP_KEYS and state_keys <= _OFFICIAL_STATE_KEYS:
        return "official"
    for keys, name in _KNOWN_FOREIGN:
        if keys <= state_keys and not ({"gsnr", "scale"} & state_keys):
            return f"foreign: {name}"
    for keys, name in _KNOWN_FOREIGN_GROUP_KEYS:
        if keys <= group_keys:
            return f"foreign: {name}"
    return f"foreign: unknown (block state keys {sorted(state_keys)}, group keys {sorted(group_keys)})"


def remember_parameter_order(model: torch.nn.Module) -> None:
    """Note each parameter's place in ``model`` (index in ``model.parameters()``, name), so that an official state dict
    written over ``model.parameters()`` can be mapped onto other groups (the Trainer's decay / no-decay groups). The
    Trainer handler calls it; in plain PyTorch call it before ``load_state_dict`` when the groups differ."""
    named = list(model.named_parameters())
    order = _ModelOrder(tuple(name for name, _ in named), tuple(bool(p.requires_grad) for _, p in named))
    for index, (_, param) in enumerate(named):
        _MODEL_ORDER[param] = (order, index)


@dataclass(frozen=True, eq=False)
class _ModelOrder:
    names: tuple[str, ...]
    trainable: tuple[bool, ...]


#: Parameter -> (its model's order, its index there): see :func:`remember_parameter_order`.
_MODEL_ORDER: WeakIdKeyDictionary = WeakIdKeyDictionary()
#: Optimizer -> for each of its groups, the saved group its hyperparameters came from, and how many
#: saved groups there were (after an official import that regrouped): see :func:`align_scheduler`.
_REGROUPED: "weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple[list[int], int]]" = weakref.WeakKeyDictionary()


def _sources_in_model_order(optimizer: torch.optim.Optimizer, saved_groups: Sequence[Mapping[str, Any]]) -> list[int]:
    """For each parameter of ``optimizer`` (group order), the position of its entry among the saved
    groups' flattened ``params``, found through the parameters' model order (or the saved
    ``param_names``); ``ValueError`` saying what to do when the two cannot be matched."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    saved_count = sum(len(g["params"]) for g in saved_groups)
    layout = f"{[len(g['params']) for g in saved_groups]} parameters per group; this optimizer has {[len(g['params']) for g in optimizer.param_groups]}"
    places = [_MODEL_ORDER.get(p) for p in params]
    orders = {id(place[0]) for place in places if place is not None}
    if None in places or len(orders) != 1:
        raise ValueError(
            f"Official sgd-sai optimizer state dict: its groups hold {layout}, and the parameters' order in "
            "their model is unknown, so its momentum buffers cannot be matched to the parameters. Build the "
            "optimizer with the same groups as the official run (e.g. SGDSaI(model.parameters())), or call "
            "sai_hf.checkpoint.remember_parameter_order(model) before load_state_dict."
        )
    order = places[0][0]
    if all("param_names" in g for g in saved_groups):
        saved_names = [name for g in saved_groups for name in g["param_names"]]
        position = {name: i for i, name in enumerate(saved_names)}
        missing = [order.names[index] for _, index in places if order.names[index] not in position]
        if missing:
            raise ValueError(f"Official sgd-sai optimizer state dict has no entry for parameter(s) {missing[:5]}")
        return [position[order.names[index]] for _, index in places]
    if saved_count == len(order.names):  # built over model.parameters()
        return [index for _, index in places]
    trainable = [i for i, t in enumerate(order.trainable) if t]
    if saved_count == len(trainable):  # built over the trainable parameters only
        rank = {index: i for i, index in enumerate(trainable)}
        if all(index in rank for _, index in places):
            return [rank[index] for _, index in places]
    raise ValueError(
        f"Official sgd-sai optimizer state dict: its groups hold {layout}; its model has {len(order.names)} "
        f"parameters ({len(trainable)} trainable), so the saved entries cannot be matched to the parameters "
        "(a checkpoint of another model?)"
    )


def _import_official(optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The official package's state dict as this package's: ``scale = gsnr = float(gsnr)``, ``momentum_buffer`` kept,
    ``step`` 1 (it only seeds stochastic rounding), groups completed with this optimizer's options and
    ``normalize="none"``; the saved groups' keys (``lr``, ``momentum``, ``eps``, ``weight_decay``, ``initial_lr``) win.

    Groups of the saved sizes are matched by position (as torch does). Otherwise (the official optimizer over
    ``model.parameters()``, the Trainer's two groups) parameters are matched through the model's order
    (:func:`remember_parameter_order`), each group takes its parameters' saved group's hyperparameters, and
    :func:`align_scheduler` regroups the LR scheduler's loaded lists."""
    saved_groups = state_dict["param_groups"]
    saved_ids = [i for g in saved_groups for i in g["params"]]
    saved_group_of = [index for index, g in enumerate(saved_groups) for _ in g["params"]]
    regroup = [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in optimizer.param_groups]
    sources = _sources_in_model_order(optimizer, saved_groups) if regroup else list(range(len(saved_ids)))
    saved_state = _block_states(state_dict)
    unmatched = set(saved_state) - {saved_ids[i] for i in sources}
    if any(saved_state[key] for key in unmatched):
        raise ValueError(
            f"Official sgd-sai optimizer state dict has state for saved parameter id(s) {sorted(unmatched, key=str)[:5]}, "
            "which this optimizer does not train"
        )
    state: dict[Any, dict[str, Any]] = {}
    frozen: list[int] = []  # this optimizer's parameter indices whose official g-SNR is 0
    for new_id, source in enumerate(sources):
        entry = saved_state.get(saved_ids[source])
        if not entry:
            continue
        converted: dict[str, Any] = {}
        if "gsnr" in entry:
            gsnr = _official_gsnr(entry["gsnr"], saved_ids[source], new_id)
            converted.update(gsnr=gsnr, scale=gsnr, gsnr_eps_free=False)
            if gsnr == 0.0:
                frozen.append(new_id)
        if "momentum_buffer" in entry:
            converted.update(momentum_buffer=entry["momentum_buffer"], step=1)
        state[new_id if regroup else saved_ids[source]] = converted
    finite = [e["gsnr"] for e in state.values() if "gsnr" in e and math.isfinite(e["gsnr"])]
    groups, origins, start = [], [], 0
    for index, own in enumerate(optimizer.param_groups):
        members = sources[start : start + len(own["params"])]
        origin = sorted({saved_group_of[m] for m in members}) or [min(index, len(saved_groups) - 1)]
        keys = [{k: v for k, v in saved_groups[o].items() if k not in ("params", "param_names")} for o in origin]
        if any(k != keys[0] for k in keys[1:]):
            raise ValueError(
                f"Official sgd-sai optimizer state dict: parameter group #{index} of this optimizer takes parameters "
                f"from saved groups {origin}, whose hyperparameters differ ({keys}); group the parameters as the "
                "official run did"
            )
        group = {k: v for k, v in own.items() if k not in ("params", "param_names")}
        if regroup:
            group.update(keys[0], params=list(range(start, start + len(own["params"]))))
        else:
            group.update({k: v for k, v in saved_groups[index].items()})
        group.update(normalize="none", gsnr_max=max(finite) if finite else None)
        groups.append(group)
        origins.append(origin[0])
        start += len(own["params"])
    if regroup:
        _REGROUPED[optimizer] = (origins, len(saved_groups))
    else:
        _REGROUPED.pop(optimizer, None)
    warnings.warn(
        f"SGDSaI: importing an official sgd-sai (SGD_sai) optimizer state: {len(finite)} block g-SNR value(s) "
        "become the scales (normalize='none', the official rule) and the momentum buffers are kept"
        + (
            f"; its {len(saved_groups)} parameter group(s) were matched to this optimizer's {len(groups)} through "
            "the model's parameter order, each taking its saved group's hyperparameters"
            if regroup
            else ""
        )
        + "."
        + _frozen_note(optimizer, frozen),
        stacklevel=user_stacklevel(),
    )
    return {"state": state, "param_groups": groups}


def _official_gsnr(value: Any, saved_id: Any, index: int) -> float:
    """One official block's ``gsnr`` as a float; ``ValueError`` naming the block when it is not one number."""
    where = f"parameter #{index} (saved id {saved_id!r})"
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
        raise ValueError(
            f"Official sgd-sai optimizer state dict: 'gsnr' of {where} is {_describe(value)}, expected one number"
        )
    if isinstance(value, Tensor) and (value.numel() != 1 or value.is_complex() or value.dtype == torch.bool):
        raise ValueError(
            f"Official sgd-sai optimizer state dict: 'gsnr' of {where} is a {value.dtype} tensor of {_describe(value)}, "
            "expected one real number (a corrupt checkpoint?)"
        )
    return float(value.item() if isinstance(value, Tensor) else value)


def _frozen_note(optimizer: torch.optim.Optimizer, frozen: Sequence[int]) -> str:
    """The import warning's note on blocks whose official g-SNR is 0 (their first gradient was zero: LoRA's
    ``lora_A``, whose ``lora_B`` starts at zero): their scale stays 0, so they stay frozen as in the official run."""
    if not frozen:
        return ""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    names = []
    for index in frozen[:5]:
        place = _MODEL_ORDER.get(params[index])
        names.append(place[0].names[place[1]] if place is not None else f"#{index}")
    more = f" and {len(frozen) - 5} more" if len(frozen) > 5 else ""
    return (
        f" {len(frozen)} block(s) have an official g-SNR of 0 ({', '.join(names)}{more}; a first gradient of zero, as "
        "LoRA's lora_A has): their scale stays 0, so their gradient never moves them (weight decay still does), as in "
        "the official run. To let them "
        "train, delete their 'gsnr' entries from the state dict before loading it: sai-hf then scales them from "
        "their next non-zero gradient, as it does blocks deferred in its own runs."
    )


def align_scheduler(optimizer: torch.optim.Optimizer, scheduler: Any) -> bool:
    """After an official import that regrouped ``optimizer``, give the LR ``scheduler`` loaded from the same checkpoint
    one entry per group in each per-group list (``base_lrs``, ``_last_lr``, ...), each group taking its saved group's
    entry; lists already of that length are left alone. Returns whether anything changed."""
    found = _REGROUPED.get(optimizer)
    if found is None:
        return False
    origins, saved_count = found
    changed = False
    for name, value in list(vars(scheduler).items()):
        if isinstance(value, list) and len(value) == saved_count != len(origins):
            setattr(scheduler, name, [value[o] for o in origins])
            changed = True
    return changed


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
    kind = state_dict_kind(state_dict, optimizer.sharding.state_keys(optimizer.param_groups), optimizer.sharding.state_keys())
    if kind.startswith("foreign"):
        raise ValueError(
            f"This optimizer state dict is not SGD-SaI's: it looks like {kind.removeprefix('foreign: ')}. "
            "SGDSaI loads state dicts written by sai_hf.SGDSaI or by the official sgd-sai package; to switch "
            "optimizers, start without the optimizer state (e.g. load the model weights only)."
        )
    if kind.startswith("layout"):
        raise ValueError(
            f"This SGD-SaI state dict has block state keys {kind.removeprefix('layout: ')} of another parameter layout "
            "than this optimizer's (a sharding backend's: a DeepSpeed ZeRO partition's state loads under DeepSpeed, "
            "through the engine's checkpoint)."
        )
    if kind == "official":
        state_dict = _import_official(optimizer, state_dict)
    _check_blocks(optimizer, state_dict)
    return state_dict


#: Group options a checkpoint restores over the ones the resumed run was built with (torch's ``load_state_dict``
#: keeps the saved groups); ``lr`` is left out: schedulers own it (and ``momentum`` where one cycles it).
RESTORED_OPTIONS = ("momentum", "weight_decay", "eps", "normalize", "scale_rule", "maximize", "momentum_dtype")


def warn_restored_options(optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any]) -> None:
    """Warn, naming each option, where the checkpoint's group options differ from those ``optimizer`` was built with
    (a resume with another ``--optim_args`` continues with the checkpoint's: ``momentum_dtype=bf16`` would not
    halve the state, ``normalize`` would not change what ``lr`` means)."""
    changes = [
        f"{key}={saved[key]!r} (given: {current[key]!r}, group #{index})"
        for index, (current, saved) in enumerate(zip(optimizer.param_groups, state_dict["param_groups"]))
        for key in RESTORED_OPTIONS
        if key in current and key in saved and saved[key] != current[key]
        and not (key == "momentum" and "base_momentum" in saved)  # OneCycleLR / CyclicLR move momentum themselves
    ]
    if changes:
        warnings.warn(
            "SGDSaI: the checkpoint's settings replace the ones given now: " + ", ".join(changes)
            + ". A resumed run continues with the checkpoint's; start a new run to change them.",
            UserWarning,
            stacklevel=user_stacklevel(),
        )


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
