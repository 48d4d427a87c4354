"""From reduced g-SNR statistics to per-block scales: pure functions, no optimizer, no tensors kept.

For the blocks measured in one scaling step (rows of whole-block statistics, :mod:`sai_hf.gsnr`)::

    gsnr_i, status_i = gsnr_from_statistics(rows_i, eps_i, eps_free_i)           (measured_gsnr)
    gsnr_max         = max { gsnr_i : status_i = SCALED }                        (first_step_gsnr_max)
                       (scale_rule="sqrt_numel": max { sqrt(numel_i) : status_i != PENDING })
    basis_i          = gsnr_i                                                     scale_rule="gsnr"
                     = gsnr_max (1.0 before it is known)     if status_i = DEGENERATE
                     = sqrt(numel_i)                                              scale_rule="sqrt_numel"
    scale_i          = basis_i                                                    normalize="none"
                     = basis_i / gsnr_max (1.0 before it is known)               normalize="max"

``gsnr_max`` is fixed by the first scaling step that has one and reused by every later step.
``PENDING`` blocks get no scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .gsnr import BlockStatus, gsnr_from_statistics

__all__ = ["NORMALIZATIONS", "SCALE_RULES", "AssignedScale", "measured_gsnr", "first_step_gsnr_max", "assigned_scales"]

#: Accepted values of ``normalize``.
NORMALIZATIONS = ("none", "max")
#: Accepted values of ``scale_rule``: what a block's scale is built from.
SCALE_RULES = ("gsnr", "sqrt_numel")


@dataclass(frozen=True)
class AssignedScale:
    """A block's g-SNR (``basis_i`` under ``scale_rule="gsnr"``, the measured g-SNR under
    ``"sqrt_numel"``, 0 if degenerate there), its scale and its status."""

    gsnr: float
    scale: float
    status: BlockStatus


def measured_gsnr(
    stats: torch.Tensor, eps: Sequence[float], eps_free: Sequence[bool]
) -> tuple[list[float], list[BlockStatus]]:
    """g-SNR and :class:`~sai_hf.gsnr.BlockStatus` of each row of ``stats`` as host values (the one
    host sync of a scaling step). ``eps_free[i]`` drops block ``i``'s eps: ``gsnr = norm / std``."""
    eps_t = torch.tensor(list(eps), dtype=stats.dtype, device=stats.device)
    eps_free_t = torch.tensor(list(eps_free), dtype=torch.bool, device=stats.device)
    gsnr, status = gsnr_from_statistics(stats, eps_t, eps_free=eps_free_t)
    values, codes = torch.stack((gsnr, status.to(gsnr.dtype))).tolist()
    return values, [BlockStatus(int(c)) for c in codes]


def first_step_gsnr_max(
    values: Sequence[float], statuses: Sequence[BlockStatus], numels: Sequence[int], scale_rule: str
) -> float | None:
    """The ``normalize="max"`` divisor of a scaling step, ``None`` if it has none (see the module docstring)."""
    if scale_rule == "sqrt_numel":
        known = [math.sqrt(n) for n, s in zip(numels, statuses) if s != BlockStatus.PENDING]
    else:
        known = [v for v, s in zip(values, statuses) if s == BlockStatus.SCALED]
    return max(known) if known else None


def assigned_scales(
    values: Sequence[float],
    statuses: Sequence[BlockStatus],
    numels: Sequence[int],
    gsnr_max: float | None,
    normalize: str,
    scale_rule: str,
) -> list[AssignedScale | None]:
    """The scale of each measured block (``None`` where it stays ``PENDING``; equations in the module docstring)."""
    out: list[AssignedScale | None] = []
    for value, status, numel in zip(values, statuses, numels):
        if status == BlockStatus.PENDING:
            out.append(None)
            continue
        if scale_rule != "sqrt_numel" and status == BlockStatus.DEGENERATE:
            value = gsnr_max if gsnr_max is not None else 1.0
        basis = math.sqrt(numel) if scale_rule == "sqrt_numel" else value
        scale = basis if normalize != "max" else (basis / gsnr_max if gsnr_max is not None else 1.0)
        out.append(AssignedScale(float(value), float(scale), status))
    return out
