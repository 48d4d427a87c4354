"""SGD-SaI's hyperparameters: which values are valid, and which every parameter group must share."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .gsnr import NORMALIZATIONS, SCALE_RULES

__all__ = ["SHARED_HYPERPARAMETERS", "check_shared", "validate_hyperparameters"]

#: Hyperparameters every parameter group must share (the first scaling step's divisor is global).
SHARED_HYPERPARAMETERS = ("normalize", "scale_rule")


def validate_hyperparameters(**values: Any) -> None:
    """Raise ``ValueError`` naming the first invalid hyperparameter among ``values``: ``lr``, ``weight_decay``, ``eps``
    (>= 0), ``momentum`` (in [0, 1)), every other number finite; ``normalize`` / ``scale_rule`` (one of
    :data:`NORMALIZATIONS` / :data:`SCALE_RULES`); ``maximize`` (a bool); ``momentum_dtype`` (a floating ``torch.dtype``
    or None); ``fused`` / ``foreach`` (a bool or None, not both True)."""
    for key, value in values.items():
        if key == "maximize":
            ok, expected = isinstance(value, bool), "True or False"
        elif key in ("fused", "foreach"):
            ok, expected = value is None or isinstance(value, bool), "True, False or None"
        elif key in ("normalize", "scale_rule"):
            accepted = NORMALIZATIONS if key == "normalize" else SCALE_RULES
            ok, expected = value in accepted, f"one of {list(accepted)}"
        elif key == "momentum_dtype":
            ok = value is None or (isinstance(value, torch.dtype) and value.is_floating_point)
            expected = "a floating torch.dtype or None"
        else:
            ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            expected = "a finite number"
        if not ok:
            raise ValueError(f"Invalid {key}={value!r}: expected {expected}")
        if key == "momentum" and not 0.0 <= value < 1.0:
            raise ValueError(f"Invalid momentum={value!r}: must be in [0, 1)")
        if key in ("lr", "eps", "weight_decay") and value < 0.0:
            raise ValueError(f"Invalid {key}={value!r}: must be >= 0")
    if values.get("fused") and values.get("foreach"):
        raise ValueError("Invalid fused=True with foreach=True: choose one path")


def check_shared(group: Mapping[str, Any], groups: Sequence[Mapping[str, Any]], defaults: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` where ``group``, about to be added after ``groups``, has another value (given, or the
    optimizer's ``defaults``) of one of :data:`SHARED_HYPERPARAMETERS` than group #0."""
    for key in SHARED_HYPERPARAMETERS:
        value = group.get(key, defaults[key])
        if groups and value != groups[0][key]:
            source = "given" if key in group else "the optimizer's default"
            raise ValueError(
                f"Invalid {key}={value!r} ({source}) for parameter group #{len(groups)}: "
                f"all groups share one {key}, and group #0 has {groups[0][key]!r}"
            )
